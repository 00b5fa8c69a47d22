"""Divergences against values computed by hand from reference/algorithms.md §0.4–0.5 and §6.1."""

import math

import pytest
import torch
import torch.nn.functional as F

from opd.trainer.divergences import (
    forward_kl,
    full_vocab_divergence,
    generalized_jsd,
    kl_penalty,
    reverse_kl,
    student_topk_divergence,
    teacher_topk_forward_kl,
    with_tail,
)
from opd.trainer.losses import entropy_from_logits
from opd.trainer.selection import normalized_entropy, normalized_jsd

S2 = torch.log(torch.tensor([0.5, 0.5]))
T2 = torch.log(torch.tensor([0.25, 0.75]))
S4 = [0.4, 0.3, 0.2, 0.1]
T4 = [0.1, 0.2, 0.3, 0.4]


def _logits(probs):
    return torch.log(torch.tensor(probs)).view(1, 1, -1)


def _sgd_moves_toward_teacher(loss_fn, teacher_logits, steps=1, lr=0.5):
    """One SGD step on ``loss_fn(student_logits)`` must shrink the L1 gap between student and teacher
    probs."""
    student = torch.zeros_like(teacher_logits, requires_grad=True)
    q = torch.softmax(teacher_logits, -1)
    gap_before = (torch.softmax(student.detach(), -1) - q).abs().sum()
    loss_fn(student).sum().backward()
    with torch.no_grad():
        gap_after = (torch.softmax(student - lr * student.grad, -1) - q).abs().sum()
    assert gap_after < gap_before


# ---- §0.4 KL-to-reference estimators
# -------------------------------------------------------------------------


def test_kl_penalty_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.2]]))  # delta = ln 2, 0
    ln2 = math.log(2)
    assert kl_penalty(logp, ref, "k1")[0].tolist() == pytest.approx([ln2, 0.0])
    assert kl_penalty(logp, ref, "k2")[0].tolist() == pytest.approx([0.5 * ln2**2, 0.0])
    k3 = [math.exp(-ln2) + ln2 - 1, 0.0]  # r - log r - 1 with r = pi_ref / pi_theta = 0.5
    assert kl_penalty(logp, ref, "k3")[0].tolist() == pytest.approx(k3)
    assert kl_penalty(logp, ref, "low_var_kl")[0].tolist() == pytest.approx(k3)
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_penalty(logp, ref, "k4")


def test_k3_nonnegative_zero_when_equal_and_clamped():
    torch.manual_seed(0)
    a, b = torch.randn(4, 7), torch.randn(4, 7)
    assert (kl_penalty(a, b, "k3") >= 0).all()
    assert torch.equal(kl_penalty(a, a, "k3"), torch.zeros(4, 7))
    # delta = -30 -> -delta clamped to 20 -> e^20 - 21 -> result clamped to 10; delta = +30 -> e^-20 + 19 ->
    # 10.
    extreme = kl_penalty(torch.tensor([[-30.0, 30.0]]), torch.zeros(1, 2), "k3")
    assert extreme[0].tolist() == [10.0, 10.0]


def test_k3_gradient_moves_logp_toward_reference():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]], requires_grad=True)
    kl_penalty(logp, ref, "k3").sum().backward()
    assert logp.grad.item() == pytest.approx(1 - 0.5)  # d/d delta = 1 - exp(-delta), delta = ln 2
    assert ref.grad is None  # the reference is a constant
    assert (logp - 0.1 * logp.grad).item() < logp.item()


# ---- §0.5 reverse / forward KL and generalised JSD
# --------------------------------------------------------------


def test_reverse_and_forward_kl_by_hand():
    rev = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    fwd = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert reverse_kl(S2, T2).item() == pytest.approx(rev)
    assert forward_kl(S2, T2).item() == pytest.approx(fwd)
    assert rev != pytest.approx(fwd)


def test_reverse_kl_avoids_kl_div_direction_pitfall():
    torch.manual_seed(1)
    s, t = torch.log_softmax(torch.randn(3, 6), -1), torch.log_softmax(torch.randn(3, 6), -1)
    explicit = (s.exp() * (s - t)).sum(-1)  # sum_v S (log S - log T)
    assert torch.allclose(reverse_kl(s, t), explicit, atol=1e-6)
    # F.kl_div(input=log S, target=log T) is KL(T||S): the forward direction, not reverse.
    kl_div_naive = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(forward_kl(s, t), kl_div_naive, atol=1e-6)
    assert not torch.allclose(reverse_kl(s, t), kl_div_naive, atol=1e-3)


@pytest.mark.parametrize("beta", [0.5, 0.3])
def test_jsd_by_hand(beta):
    s, t = [0.5, 0.5], [0.25, 0.75]
    m = [beta * tv + (1 - beta) * sv for sv, tv in zip(s, t, strict=True)]
    kl_t_m = sum(tv * math.log(tv / mv) for tv, mv in zip(t, m, strict=True))
    kl_s_m = sum(sv * math.log(sv / mv) for sv, mv in zip(s, m, strict=True))
    assert generalized_jsd(S2, T2, beta).item() == pytest.approx(beta * kl_t_m + (1 - beta) * kl_s_m)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    torch.manual_seed(2)
    s, t = torch.log_softmax(torch.randn(2, 3, 5), -1), torch.log_softmax(torch.randn(2, 3, 5), -1)
    assert torch.equal(generalized_jsd(s, t, 0.0), forward_kl(s, t))
    assert torch.equal(generalized_jsd(s, t, 1.0), reverse_kl(s, t))
    # Why the special case: the interior formula vanishes near the ends instead of reaching the KLs.
    assert (generalized_jsd(s, t, 1e-4) < 0.01 * forward_kl(s, t)).all()
    with pytest.raises(ValueError):
        generalized_jsd(s, t, 1.5)


def test_jsd_half_is_bounded_by_ln2():
    torch.manual_seed(3)
    s, t = torch.log_softmax(5 * torch.randn(64, 9), -1), torch.log_softmax(5 * torch.randn(64, 9), -1)
    jsd = generalized_jsd(s, t, 0.5)
    assert (jsd >= -1e-6).all() and (jsd <= math.log(2) + 1e-6).all()
    disjoint = generalized_jsd(
        torch.log_softmax(torch.tensor([60.0, 0.0]), -1),
        torch.log_softmax(torch.tensor([0.0, 60.0]), -1),
        0.5,
    )
    assert disjoint.item() == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("fn", [reverse_kl, forward_kl, lambda s, t: generalized_jsd(s, t, 0.5)])
def test_divergence_gradient_flows_through_student_only(fn):
    teacher = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    _sgd_moves_toward_teacher(
        lambda z: fn(torch.log_softmax(z, -1), torch.log_softmax(teacher, -1)), teacher.detach()
    )
    assert teacher.grad is None


# ---- top-k supports
# --------------------------------------------------------------------------------------------


def test_with_tail_by_hand_and_sums_to_one():
    out = with_tail(torch.log(torch.tensor([0.5, 0.2])))
    assert out.exp().tolist() == pytest.approx([0.5, 0.2, 0.3])
    torch.manual_seed(4)
    topk = torch.log_softmax(torch.randn(2, 3, 10), -1).topk(4, -1).values
    assert torch.allclose(with_tail(topk).exp().sum(-1), torch.ones(2, 3), atol=1e-6)
    full = with_tail(torch.log(torch.tensor([0.5, 0.5])))  # no mass left: finite tiny tail, not log 0
    assert torch.isfinite(full).all() and full[-1].item() == pytest.approx(math.log(1e-7), abs=1e-3)


def test_student_topk_with_tail_by_hand():
    # Student's top-2 are ids 0, 1 (the teacher's would be 3, 2): S' = [.4, .3, .3], T' = [.1, .2, .7].
    div, ent = student_topk_divergence(_logits(S4), _logits(T4), k=2, beta=1.0, tail=True)
    rev = 0.4 * math.log(0.4 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.3 * math.log(0.3 / 0.7)
    assert div.item() == pytest.approx(rev, rel=1e-5)
    assert ent.item() == pytest.approx(
        -(0.1 * math.log(0.1) + 0.2 * math.log(0.2) + 0.7 * math.log(0.7)), rel=1e-5
    )


def test_student_topk_renormalized_without_tail_by_hand():
    div, ent = student_topk_divergence(_logits(S4), _logits(T4), k=2, beta=0.0, tail=False)
    s, t = [4 / 7, 3 / 7], [1 / 3, 2 / 3]
    assert div.item() == pytest.approx(
        sum(tv * math.log(tv / sv) for sv, tv in zip(s, t, strict=True)), rel=1e-5
    )
    assert ent.item() == pytest.approx(-(t[0] * math.log(t[0]) + t[1] * math.log(t[1])), rel=1e-5)


def test_student_topk_full_support_matches_full_vocab_and_descends():
    torch.manual_seed(5)
    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    div, _ = student_topk_divergence(s, t, k=6, beta=1.0, tail=False)
    assert torch.allclose(div, full_vocab_divergence(s, t, torch.ones(2, 3), "reverse"), atol=1e-6)
    _sgd_moves_toward_teacher(lambda z: student_topk_divergence(z, t[:1, :1], k=3, beta=0.5)[0], t[:1, :1])


def test_teacher_topk_forward_kl_by_hand():
    s_logp = _logits(S4)
    ids = torch.tensor([[[3, 2]]])
    t_topk = torch.log(torch.tensor([[[0.4, 0.3]]]))
    # Tail: student side [.1, .2, .7] (mass outside ids 3, 2), teacher side [.4, .3, .3].
    fwd = 0.4 * math.log(0.4 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.3 * math.log(0.3 / 0.7)
    assert teacher_topk_forward_kl(s_logp, ids, t_topk).item() == pytest.approx(fwd, rel=1e-5)
    s, t = [1 / 3, 2 / 3], [4 / 7, 3 / 7]
    no_tail = sum(tv * math.log(tv / sv) for sv, tv in zip(s, t, strict=True))
    assert teacher_topk_forward_kl(s_logp, ids, t_topk, tail=False).item() == pytest.approx(no_tail, rel=1e-5)


def test_teacher_topk_forward_kl_descends():
    teacher = torch.tensor([[[3.0, 1.0, 0.0, -1.0, -2.0]]])
    t_logp = torch.log_softmax(teacher, -1)
    ids = t_logp.topk(2, -1).indices
    loss = lambda z: teacher_topk_forward_kl(torch.log_softmax(z, -1), ids, t_logp.gather(-1, ids))  # noqa: E731
    _sgd_moves_toward_teacher(loss, teacher)


def _nearly_all_in(top_logits, tail_mass, n_tail=5):
    """Float64 logits whose first entries hold all but ``tail_mass`` of the mass, spread evenly over
    ``n_tail``."""
    top = torch.tensor(top_logits, dtype=torch.float64)
    z_tail = math.log(tail_mass / (1 - tail_mass) * float(top.exp().sum()) / n_tail)
    return torch.cat([top, torch.full((n_tail,), z_tail, dtype=torch.float64)]).view(1, 1, -1)


def _support(logp, k):
    """Reference (K+1)-category support: the first k log-probs and the exact log-mass of the rest."""
    return torch.cat([logp[..., :k], torch.logsumexp(logp[..., k:], -1, keepdim=True)], -1)


@pytest.mark.parametrize("tail_mass", [4e-8, 2e-12])
def test_teacher_topk_forward_kl_is_exact_when_the_student_leaves_almost_nothing_outside(tail_mass):
    """The student's tail is the mass outside the teacher's top-k, summed in log space: with a tail of 4e-8 or
    2e-12 (log(1 - Σp) rounds it to a clamp there) the loss equals a float64 reference, and so does the
    gradient that raises the tail logits towards the teacher's 12% tail."""
    z = _nearly_all_in([0.0, 1.0, 0.5], tail_mass).requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    ids = torch.tensor([[[0, 1, 2]]])
    t_top = torch.log(torch.tensor([[[0.5, 0.25, 0.13]]], dtype=torch.float64))
    got = teacher_topk_forward_kl(torch.log_softmax(z, -1), ids, t_top)
    t_sup = torch.cat([t_top, torch.log(torch.tensor([[[0.12]]], dtype=torch.float64))], -1)
    want = (t_sup.exp() * (t_sup - _support(torch.log_softmax(z_ref, -1), 3))).sum(-1)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.sum().backward()
    want.sum().backward()
    assert (z.grad[..., 3:] < -0.02).all()  # about -0.12 / 5 each: mass flows back to the tail
    assert torch.allclose(z.grad, z_ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("tail_mass", [4e-8, 2e-12])
def test_sdpo_forward_kl_over_the_student_top_k_is_exact_for_a_tiny_student_tail(tail_mass):
    """SDPO at alpha = 0 (forward KL(T‖S) over the student's top-k + tail): both tails are the exact log-mass
    outside the student's top-k, so a student tail of 4e-8 or 2e-12 gives the float64 reference's loss,
    gradient and teacher entropy."""
    z = _nearly_all_in([0.0, 1.0, 0.5], tail_mass).requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    teacher = torch.tensor([[[1.0, 0.0, 0.5, 0.0, -1.0, 0.3, 0.2, -0.5]]], dtype=torch.float64)
    div, ent = student_topk_divergence(z, teacher, k=3, beta=0.0)
    t_sup = _support(torch.log_softmax(teacher, -1), 3)
    want = (t_sup.exp() * (t_sup - _support(torch.log_softmax(z_ref, -1), 3))).sum(-1)
    assert div.item() == pytest.approx(want.item(), rel=1e-5)
    assert ent.item() == pytest.approx(-(t_sup.exp() * t_sup).sum().item(), rel=1e-5)
    div.sum().backward()
    want.sum().backward()
    assert (z.grad[..., 3:] < -0.01).all()
    assert torch.allclose(z.grad, z_ref.grad, rtol=1e-4, atol=1e-7)


# ---- full vocabulary
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
def test_full_vocab_chunked_equals_unchunked(kind):
    torch.manual_seed(6)
    t = torch.randn(3, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    s1 = torch.randn(3, 5, 11, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    chunked = full_vocab_divergence(s1, t, mask, kind, beta=0.3, chunk_tokens=2)
    whole = full_vocab_divergence(s2, t, mask, kind, beta=0.3, chunk_tokens=10_000)
    fns = {"reverse": reverse_kl, "forward": forward_kl, "jsd": lambda a, b: generalized_jsd(a, b, 0.3)}
    direct = fns[kind](torch.log_softmax(s1.detach(), -1), torch.log_softmax(t, -1)) * mask
    assert torch.allclose(chunked, whole, atol=1e-6) and torch.allclose(chunked, direct, atol=1e-6)
    assert (chunked[mask == 0] == 0).all()
    chunked.sum().backward()
    whole.sum().backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6) and (s1.grad[mask == 0] == 0).all()


def test_full_vocab_by_hand_and_all_masked():
    s, t = torch.log(torch.tensor([[[0.5, 0.5]]])), torch.log(torch.tensor([[[0.25, 0.75]]]))
    rev = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert full_vocab_divergence(s, t, torch.ones(1, 1)).item() == pytest.approx(rev)
    z = torch.randn(2, 3, 4, requires_grad=True)
    out = full_vocab_divergence(z, torch.randn(2, 3, 4), torch.zeros(2, 3), "jsd")
    out.sum().backward()
    assert torch.equal(out.detach(), torch.zeros(2, 3)) and torch.equal(z.grad, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="reverse"):
        full_vocab_divergence(z, z, torch.ones(2, 3), "tv")


def test_full_vocab_descends():
    teacher = torch.tensor([[[1.0, -1.0, 0.5, 2.0]]])
    _sgd_moves_toward_teacher(
        lambda z: full_vocab_divergence(z, teacher, torch.ones(1, 1), "reverse"), teacher
    )


# ---- §6.1 normalised signals
# -----------------------------------------------------------------------------------


def test_normalized_entropy_and_jsd_by_hand():
    h = normalized_entropy(torch.tensor([[math.log(8) / 2, math.log(8), 0.0]]), vocab_size=8)
    assert h[0].tolist() == pytest.approx([0.5, 1.0, 0.0])
    s, t = S2.view(1, 1, 2), T2.view(1, 1, 2)
    m = [0.375, 0.625]
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert normalized_jsd(s, t).item() == pytest.approx(jsd / math.log(2))
    assert normalized_jsd(s, s).item() == pytest.approx(0.0, abs=1e-7)
    far = normalized_jsd(
        torch.log_softmax(torch.tensor([[[80.0, 0.0]]]), -1),
        torch.log_softmax(torch.tensor([[[0.0, 80.0]]]), -1),
    )
    assert far.item() == pytest.approx(1.0, abs=1e-5)


# ---- -inf log-probs (a masked vocabulary)
# ------------------------------------------------------------------------

DIVERGENCES = {"reverse": reverse_kl, "forward": forward_kl, "jsd": lambda s, t: generalized_jsd(s, t, 0.3)}


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_masked_vocabulary_gives_the_divergence_over_the_rest_with_finite_gradients(kind):
    """Entries both sides give -inf (a masked vocabulary) add 0, not 0 * -inf = NaN: the value and the
    gradient are those of the divergence over the unmasked entries, and the masked logits get gradient 0."""
    torch.manual_seed(7)
    s_full = torch.randn(2, 3, 6, dtype=torch.float64)
    t_full = torch.randn(2, 3, 6, dtype=torch.float64)
    s_full[..., 4:] = -math.inf
    t_full[..., 4:] = -math.inf
    s = s_full.clone().requires_grad_(True)
    s_kept = s_full[..., :4].clone().requires_grad_(True)
    fn = DIVERGENCES[kind]
    got = fn(torch.log_softmax(s, -1), torch.log_softmax(t_full, -1))
    want = fn(torch.log_softmax(s_kept, -1), torch.log_softmax(t_full[..., :4], -1))
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-12)
    got.sum().backward()
    want.sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[..., 4:] == 0).all()
    assert torch.allclose(s.grad[..., :4], s_kept.grad, atol=1e-12)
    full = full_vocab_divergence(s_full.float(), t_full.float(), torch.ones(2, 3), kind, beta=0.3)
    assert torch.allclose(full.double(), want.detach(), atol=1e-5)


def test_one_sided_zero_probability_adds_nothing_where_its_weight_is_zero():
    """Reverse KL weighs by the student: a token the student rules out (-inf) adds 0 whatever the teacher
    says; forward KL weighs by the teacher, so a token the teacher rules out adds 0; the JSD's mixture is
    positive where either is."""
    s = torch.log(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    t = torch.log(torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    assert reverse_kl(s, t).item() == pytest.approx(0.5 * math.log(2) + 0.0)
    # roles swapped: teacher -inf at entry 2
    assert forward_kl(t, s).item() == pytest.approx(0.5 * math.log(2))
    m = [0.375, 0.5, 0.125]
    jsd = 0.5 * sum(p * math.log(p / q) for p, q in zip([0.25, 0.5, 0.25], m, strict=True)) + 0.5 * sum(
        p * math.log(p / q) for p, q in zip([0.5, 0.5], m[:2], strict=True))
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(jsd)


def test_entropy_of_a_masked_vocabulary_is_finite():
    logits = torch.tensor([[[0.0, 0.0, -math.inf]]], requires_grad=True)
    h = entropy_from_logits(logits)
    h.sum().backward()
    assert h.item() == pytest.approx(math.log(2)) and torch.isfinite(logits.grad).all()
    _, t_ent = student_topk_divergence(torch.tensor([[[2.0, 1.0, 0.0]]]), logits.detach(), k=2, beta=0.5,
                                       tail=False)
    assert t_ent.item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_student_topk_with_every_other_logit_masked_has_finite_gradients(beta):
    """The student's logits are -inf outside its top-2: its tail bucket is empty (log 0) and carries no
    gradient, and the value is the divergence with the teacher's rest as one bucket (JSD at SDPO's default
    0.5; reverse KL at 1). NaN gradients before (right values). Forward KL (0) is infinite there: the teacher
    has mass the student lacks."""
    student = torch.tensor([[[1.0, 0.5, -math.inf, -math.inf]]], requires_grad=True)
    teacher = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]))
    div, _ = student_topk_divergence(student, teacher, k=2, beta=beta, tail=True)
    div.sum().backward()
    assert torch.isfinite(student.grad).all() and torch.equal(student.grad[..., 2:], torch.zeros(1, 1, 2))
    s = torch.softmax(torch.tensor([1.0, 0.5]), -1).tolist() + [0.0]
    t = [0.1, 0.2, 0.7]
    if beta == 1.0:
        want = sum(sv * math.log(sv / tv) for sv, tv in zip(s, t, strict=True) if sv)
    else:
        m = [beta * tv + (1 - beta) * sv for sv, tv in zip(s, t, strict=True)]
        want = sum(beta * tv * math.log(tv / mv) + ((1 - beta) * sv * math.log(sv / mv) if sv else 0.0)
                   for sv, tv, mv in zip(s, t, m, strict=True))
    assert div.item() == pytest.approx(want, rel=1e-5)
