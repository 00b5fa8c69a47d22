"""G-OPD, SRPO, PACED, KEPO, TIP selection and SDPO pieces against hand-computed values
(reference/algorithms.md §3–8)."""

import math

import pytest
import torch

from opd.config import Config
from opd.plan import objective_spec, spec_of
from opd.trainer.advantages import gopd_token_advantages, opd_token_advantages
from opd.trainer.batchwide import counted_tokens, denominators, live_samples
from opd.trainer.dist import Collective
from opd.trainer.divergences import student_topk_divergence
from opd.trainer.losses import aggregate, clipped_pg_loss, token_logprobs
from opd.trainer.objectives.loss import Aux, token_loss
from opd.trainer.routing import RoutePlan, route
from opd.trainer.sdpo import (
    RepromptTemplates,
    TeacherContext,
    build_reprompt,
    ema_update,
    sdpo_token_loss,
    self_teacher_contexts,
    strip_thinking,
)
from opd.trainer.selection import select_tokens
from opd.trainer.weights import entropy_weights, paced_weights, quality_gate
from opd.types import Prompt, Rewards, RolloutBatch, Sample, TeacherScores

# ---- §1.1 OPD, sampled token
# -------------------------------------------------------------------------------------


def test_sampled_opd_expected_gradient_is_the_reverse_kl_gradient_off_policy():
    """The sampler's q is the student's pi with 0.5-nat noise (stale weights, another engine's numerics).
    Tokens come from q, the router hands the learner its batch, the learner's loss weighs each by min(pi/q,
    cap): summed over the whole vocabulary with weights q(v), the gradient is exactly grad KL(pi || pi_T),
    computed by autograd."""
    torch.manual_seed(11)
    V = 6
    z = torch.randn(V, dtype=torch.float64)
    t_logp = torch.log_softmax(torch.randn(V, dtype=torch.float64), -1)
    q_logp = torch.log_softmax(torch.log_softmax(z, -1) + 0.5 * torch.tensor([1.0, -1, 1, -1, 1, -1]), -1)
    assert (torch.log_softmax(z, -1) - q_logp).exp().max() < 2.0  # the cap (opd.tis_cap = 2) does not bind

    prompt = Prompt("p", "q?", [5, 6], "1")
    samples = [Sample(f"u{v}", prompt, v, [v], "a", [float(q_logp[v])], 0) for v in range(V)]
    rewards = Rewards([s.uid for s in samples], [0.0] * V, [False] * V)
    scores = TeacherScores([s.uid for s in samples], [[float(t_logp[v])] for v in range(V)])
    batch = route(RolloutBatch(0, samples, V, 0), rewards, scores, RoutePlan("opd"))

    def expected_grad(spec):
        logits = z.clone().requires_grad_(True)
        loss_BT, _ = token_loss(
            spec, logits.expand(V, 1, V), torch.arange(V).view(V, 1), torch.ones(V, 1),
            torch.tensor(batch.sampler_logprobs),
            torch.tensor(batch.advantages), Aux(teacher_logp_BT=torch.tensor(batch.teacher_logprobs)),
        )
        (q_logp.exp().view(V, 1) * loss_BT).sum().backward()
        return logits.grad

    z_ref = z.clone().requires_grad_(True)
    pi_logp = torch.log_softmax(z_ref, -1)
    (pi_logp.exp() * (pi_logp - t_logp)).sum().backward()
    got = expected_grad(objective_spec(Config()))
    assert torch.allclose(got, z_ref.grad, atol=1e-6), (got - z_ref.grad).abs().max()
    coef2 = objective_spec(Config.model_validate({"opd": {"kl_coef": 2.0}}))
    assert torch.allclose(expected_grad(coef2), 2 * z_ref.grad, atol=2e-6)


# ---- §4 G-OPD / ExOPD
# ------------------------------------------------------------------------------------------


def test_gopd_lambda_one_is_exactly_opd():
    torch.manual_seed(0)
    t, ref, s = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    m = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(gopd_token_advantages(t, ref, s, m, lam=1.0), opd_token_advantages(s, t, m, coef=1.0))


def test_exopd_extrapolates_by_hand():
    t, ref, s = (torch.log(torch.tensor([[p]])) for p in (0.5, 0.25, 0.4))
    m = torch.ones(1, 1)
    adv = gopd_token_advantages(t, ref, s, m, lam=1.25).item()
    assert adv == pytest.approx(1.25 * math.log(0.5 / 0.25) - math.log(0.4 / 0.25))
    # Extrapolation: lam > 1 adds (lam - 1)(log pi_T - log pi_ref) on top of OPD's log pi_T - log pi_theta.
    opd = gopd_token_advantages(t, ref, s, m, lam=1.0).item()
    assert opd == pytest.approx(math.log(0.5 / 0.4))
    assert adv - opd == pytest.approx(0.25 * math.log(2)) and adv > opd


def test_gopd_masked_and_detached():
    x = torch.randn(2, 3, requires_grad=True)
    adv = gopd_token_advantages(x, x * 0.5, x * 2, torch.zeros(2, 3), lam=1.25)
    assert not adv.requires_grad and torch.equal(adv, torch.zeros(2, 3))


def test_exopd_pushes_past_teacher_where_opd_is_silent():
    """Student already matches the teacher on the token (OPD advantage 0); ExOPD still raises it since the
    teacher improved on the reference there."""
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    target = torch.tensor([[1]])
    logp = token_logprobs(logits, target)
    teacher, ref = logp.detach(), logp.detach() - 1.0
    assert gopd_token_advantages(teacher, ref, logp, torch.ones(1, 1), lam=1.0).item() == 0.0
    adv = gopd_token_advantages(teacher, ref, logp, torch.ones(1, 1), lam=1.25)
    clipped_pg_loss(logp, logp.detach(), adv, torch.ones(1, 1))[0].backward()
    with torch.no_grad():
        assert token_logprobs(logits - 0.5 * logits.grad, target) > logp


# ---- §5 SRPO
# ---------------------------------------------------------------------------------------------------


def test_srpo_routes_only_failed_rollouts_with_a_self_teacher_to_sdpo():
    """§5.1 on the router: z_sdpo = (1 - correct) * has_teacher. Groups of two: [right, wrong] (the right one
    has no teacher: its only success is itself), [right, right] (each shows the other), [wrong, wrong] (no
    teacher)."""
    prompt = Prompt("p", "q?", [5, 6], "1")
    samples = [Sample(f"u{i}", prompt, i % 2, [7, 8], "a", [-1.0, -1.0], 0) for i in range(6)]
    rewards = Rewards([s.uid for s in samples], [1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
                      [True, False, True, True, False, False])
    batch = route(RolloutBatch(0, samples, 2, 0), rewards, None, RoutePlan("srpo"),
                  render=lambda t: [9] * len(t))
    assert batch.routes == ["grpo", "sdpo", "grpo", "grpo", "grpo", "grpo"]
    assert [tp is not None for tp in batch.teacher_prompt_ids] == [False, True, True, True, False, False]


def test_entropy_weights_by_hand_mean_one():
    h = torch.tensor([[0.0, math.log(2)], [math.log(3), 5.0]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    w = entropy_weights(h, m)  # w~ = 1, 1/2, 1/3; mean 11/18
    assert w.flatten().tolist() == pytest.approx([18 / 11, 9 / 11, 6 / 11, 0.0])
    assert (w * m).sum().item() / m.sum().item() == pytest.approx(1.0)
    w2 = entropy_weights(h, m, beta=2.0)  # exp(-2H) = 1, 1/4, 1/9; mean 49/108
    assert w2[0, 1].item() == pytest.approx(0.25 * 108 / 49)
    hg = h.clone().requires_grad_(True)
    assert not entropy_weights(hg, m).requires_grad


def test_entropy_weights_all_masked_are_zero():
    w = entropy_weights(torch.rand(2, 3), torch.zeros(2, 3))
    assert torch.equal(w, torch.zeros(2, 3))


def test_entropy_weights_do_not_underflow_at_large_beta_times_entropy():
    """beta*H near 1000 (exp(-1000) is 0 even in float64): the weights keep their ratios exp(-beta*dH),
    normalised to mean 1 over the SDPO tokens, as computed by hand; a masked token's entropy may be
    anything."""
    h = torch.tensor([[1000.0, 1001.0], [1002.0, 3.0]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    mean = (1 + math.exp(-1) + math.exp(-2)) / 3
    want = [1 / mean, math.exp(-1) / mean, math.exp(-2) / mean, 0.0]
    assert entropy_weights(h, m).flatten().tolist() == pytest.approx(want, rel=1e-6)
    assert entropy_weights(h / 8, m, beta=8.0).flatten().tolist() == pytest.approx(want, rel=1e-6)
    h[1, 1] = -5000.0  # exp(+5000) would be inf, and inf * 0 NaN
    assert entropy_weights(h, m).flatten().tolist() == pytest.approx(want, rel=1e-6)


def test_srpo_objective_shares_one_denominator_and_a_step_improves_both_branches():
    """The learner's SRPO loss (§5.3): row 0 is correct (GRPO, advantage +1 on its token), row 1 failed with a
    teacher (SDPO, entropy weight 0.5). Each row's loss is its own branch's, and both count in one shared
    denominator: the mean over the two tokens. One step raises row 0's token and brings row 1 to the
    teacher."""
    logits = torch.zeros(2, 1, 4, requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[3.0, 0.0, -1.0, 0.5]]])
    target = torch.tensor([[2], [0]])
    logp = token_logprobs(logits, target).detach()
    aux = Aux(teacher_logits_BTV=teacher, route_sdpo_B=torch.tensor([0.0, 1.0]),
              entropy_weights_BT=torch.tensor([[7.0], [0.5]]))
    spec = spec_of("algorithm=srpo", "sdpo.top_k=4")
    loss_BT, count_BT = token_loss(spec, logits, target, torch.ones(2, 1), logp,
                                   torch.tensor([[1.0], [0.0]]), aux)
    sdpo_BT, _ = student_topk_divergence(logits.detach(), teacher, k=4, beta=0.5)
    assert loss_BT[:, 0].tolist() == pytest.approx([-1.0, 0.5 * sdpo_BT[1, 0].item()], rel=1e-6)
    assert count_BT.tolist() == [[1.0], [1.0]]
    (loss_BT.sum() / count_BT.sum()).backward()
    with torch.no_grad():
        stepped = logits - 1.0 * logits.grad
        assert token_logprobs(stepped, target)[0] > logp[0]
        after, _ = student_topk_divergence(stepped, teacher, k=4, beta=0.5)
        assert after[1] < sdpo_BT[1]


# ---- §7 PACED, §8.1 KEPO
# ---------------------------------------------------------------------------------------


def test_paced_weights_by_hand():
    p = torch.tensor([0.0, 0.25, 0.5, 1.0])
    raw = [0.0, 0.25 * 0.75, 0.5 * 0.5, 0.0]
    assert paced_weights(p, normalize=False).tolist() == pytest.approx(raw)
    mean_nonzero = (raw[1] + raw[2]) / 2
    assert paced_weights(p).tolist() == pytest.approx([r / mean_nonzero for r in raw])
    assert paced_weights(p, a=2.0, b=1.0, normalize=False)[2].item() == pytest.approx(0.5**2 * 0.5)
    # 0^0 = 1 would give p=0 weight 1 when a = 0; PACED still gives it 0.
    assert paced_weights(p, a=0.0, normalize=False).tolist() == pytest.approx([0.0, 0.75, 0.5, 0.0])


def test_paced_all_uninformative_is_zero():
    assert paced_weights(torch.tensor([0.0, 1.0, 1.0])).tolist() == [0.0, 0.0, 0.0]


def test_quality_gate():
    assert quality_gate(torch.tensor([0.0, 0.49, 0.5, 1.0]), 0.5).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_zero_weight_samples_leave_the_denominators_by_hand():
    """PACED gives p in {0, 1} weight 0 and promises such problems act as if filtered out: their tokens leave
    the token-mean's denominator and their sequences a sequence-mean's count (the learner's step on it is
    tests/test_learner.py::test_zero_weight_samples_count_as_filtered_out)."""
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    live = live_samples([2.0, 0.0, 0.5, 1.0], [0, 1, 2])
    assert live.tolist() == [1.0, 0.0, 1.0]
    assert counted_tokens(mask, live).sum().item() == 3 + 4  # not 9: the weight-0 row's 2 tokens stay out
    assert counted_tokens(mask, live, route_sdpo_B=torch.tensor([1.0, 1.0, 0.0])).sum().item() == 3
    assert denominators([counted_tokens(mask, live)], [live], Collective()) == (7.0, 2)
    assert live_samples(None, [0, 1]).tolist() == [1.0, 1.0]


# ---- §6 TIP selection
# ------------------------------------------------------------------------------------------

# Valid tokens (flat order) h = [.1, .9, .5, .3, .2], d = [.8, .1, .5, .2, 0]; the masked slot is the "best"
# on both axes, so any leak through the mask would be picked first.
H_SEL = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 99.0]])
D_SEL = torch.tensor([[0.8, 0.1, 0.5], [0.2, 0.0, 99.0]])
M_SEL = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _kept(mode, ratio, **kw):
    keep = select_tokens(H_SEL, D_SEL, M_SEL, ratio, mode, **kw)
    assert keep.dtype == M_SEL.dtype and keep[1, 2] == 0
    return sorted(keep.flatten().nonzero().flatten().tolist())


def test_select_top_modes_by_hand():
    assert _kept("entropy", 0.4) == [1, 2]  # floor(0.4 * 5) = 2: h = .9, .5
    assert _kept("divergence", 0.4) == [0, 2]  # d = .8, .5
    assert _kept("entropy", 0.1) == [1]  # floor(0.5) = 0 -> at least 1
    assert _kept("entropy", 0.5) == [1, 2]  # floor(2.5) = 2, not 3
    keep = select_tokens(torch.rand(1, 100), torch.rand(1, 100), torch.ones(1, 100), 0.29, "divergence")
    assert keep.sum().item() == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert _kept("divergence", 1.0) == [0, 1, 2, 3, 4]


def test_select_soft_or_by_hand():
    # h' = (h - .1)/.8 = [0, 1, .5, .25, .125]; d' = d/.8 = [1, .125, .625, .25, 0]
    # s = h' + d' - h'd' = [1, 1, .8125, .4375, .125] -> top 3 = {0, 1, 2}; top 4 adds 3.
    assert _kept("soft_or", 0.6) == [0, 1, 2]
    assert _kept("soft_or", 0.8) == [0, 1, 2, 3]
    # Soft-OR is not the plain sum: token 3 (h' = d' = .6) has sum 1.2 but s = .84 < token 4's .9 + .05 -
    # .045.
    h, d = torch.tensor([[0.0, 1.0, 0.0, 0.6, 0.9]]), torch.tensor([[0.0, 0.0, 1.0, 0.6, 0.05]])
    assert select_tokens(h, d, torch.ones(1, 5), 0.6, "soft_or").tolist() == [[0.0, 1.0, 1.0, 0.0, 1.0]]


def test_select_overconfident_quadrant_by_hand():
    # medians: h 0.3, d 0.2. Q3 = (h <= .3) & (d >= .2) = flat {0 (.1,.8), 3 (.3,.2)}.
    assert _kept("overconfident", 1.0) == [0, 3]  # "up to" keep_ratio: only 2 tokens are in Q3
    assert _kept("overconfident", 0.2) == [0]  # one slot: the higher divergence
    assert _kept("divergence", 0.4) != _kept("overconfident", 0.4)


def test_select_entropy_sample_count_and_mask():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        kept = _kept("entropy_sample", 0.6, generator=g)
        assert len(kept) == 3 and set(kept) <= {0, 1, 2, 3, 4}
    # Keep 4 of 5: the only token left out is (almost surely) the zero-entropy one with weight 1e-8.
    h = torch.tensor([[0.5, 0.0, 0.5, 0.5, 0.5]])
    keep = select_tokens(
        h, torch.zeros(1, 5), torch.ones(1, 5), 0.8, "entropy_sample", torch.Generator().manual_seed(0)
    )
    assert keep.tolist() == [[1.0, 0.0, 1.0, 1.0, 1.0]]


def test_select_all_masked_and_bad_mode():
    for mode in ("entropy", "divergence", "soft_or", "overconfident", "entropy_sample"):
        assert select_tokens(H_SEL, D_SEL, torch.zeros(2, 3), 0.5, mode).sum() == 0
    with pytest.raises(ValueError, match="soft_or"):
        select_tokens(H_SEL, D_SEL, M_SEL, 0.5, "random")


# ---- §3 SDPO
# ---------------------------------------------------------------------------------------------------


def test_build_reprompt_default_templates():
    tail = "\n\nCorrectly solve the original question."
    assert build_reprompt("Q {x}?", None, None) == "Q {x}?"
    assert build_reprompt("Q {x}?", "A {y}", None) == "Q {x}?" + "\nCorrect solution:\n\nA {y}" + tail
    fb = "\nThe following is feedback from your unsuccessful earlier attempt:\n\nwrong"
    assert build_reprompt("Q", None, "wrong") == "Q" + fb + tail
    assert build_reprompt("Q", "A", "wrong") == "Q\nCorrect solution:\n\nA" + fb + tail
    custom = RepromptTemplates(
        reprompt="{solution}|{prompt}{feedback}", solution="S:{successful_previous_attempt}"
    )
    assert build_reprompt("Q", "A", None, custom) == "S:A|Q"


def test_strip_thinking():
    assert strip_thinking("<think>a\nb</think>\n\nAnswer 4") == "Answer 4"
    assert strip_thinking("<think>x</think> keep <think>y</think>end") == "keep end"


def test_self_teacher_contexts_default_rules():
    C = TeacherContext
    ctx = self_teacher_contexts([1, 0, 1, 0], ["<think>r</think> a", "b", "c", "d"], [None, "fb1", "", "fb3"])
    # 0: a success, not its own teacher -> next success "c"; 1, 3: first success, thinking stripped, feedback
    # dropped because a solution exists; 2: success -> "a" (the other success).
    assert ctx == [C("c", None), C("a", None), C("a", None), C("a", None)]


def test_self_teacher_contexts_edge_rules():
    # All wrong: only non-blank feedback gives a teacher.
    assert self_teacher_contexts([0.0, 0.0], ["a", "b"], ["fb", "  "]) == [TeacherContext(None, "fb"), None]
    # Lone success: no teacher for itself unless self-reprompting is allowed.
    assert self_teacher_contexts([1.0, 0.0], ["a", "b"], None) == [None, TeacherContext("a", None)]
    own = self_teacher_contexts([1.0, 0.0], ["a", "b"], None, dont_reprompt_on_self_success=False)
    assert own[0] == ("a", None)
    both = self_teacher_contexts([1.0, 0.0], ["a", "b"], ["x", "y"], feedback_only_without_solution=False)
    assert both == [TeacherContext(None, "x"), TeacherContext("a", "y")]
    assert self_teacher_contexts([0.0], ["a"], ["fb"], include_feedback=False) == [None]
    assert self_teacher_contexts([0.5, 0.0], ["a", "b"], None, success_threshold=0.5)[1] == ("a", None)
    assert self_teacher_contexts([0.5, 0.0], ["a", "b"], None)[1] is None  # default threshold 1.0
    with pytest.raises(ValueError):
        self_teacher_contexts([1.0], ["a", "b"], None)


def test_sdpo_token_loss_by_hand():
    student = torch.log(torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]]))
    teacher = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.4]] * 3]))
    sampler = torch.tensor([[-1.0, -1.0, -1.0]])
    old = sampler + torch.tensor([[math.log(3.0), math.log(0.5), 0.0]])  # TIS = min(3, 2) = 2, then 0.5
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, ent = sdpo_token_loss(student, teacher, old, sampler, mask, k=2, alpha=1.0)
    # Student top-2 + tail: S' = [.4, .3, .3], T' = [.1, .2, .7]; reverse KL:
    rev = 0.4 * math.log(0.4 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.3 * math.log(0.3 / 0.7)
    assert loss[0].tolist() == pytest.approx([2.0 * rev, 0.5 * rev, 0.0], rel=1e-5)
    h = -(0.1 * math.log(0.1) + 0.2 * math.log(0.2) + 0.7 * math.log(0.7))
    assert ent[0].tolist() == pytest.approx([h, h, 0.0], rel=1e-5)
    # is_clip on pi_theta / pi_old: ratio 1.5 passes, ratio 3 is capped at 2 (no sampler TIS here).
    cur = old + torch.tensor([[math.log(1.5), math.log(3.0), 0.0]])
    loss2, _ = sdpo_token_loss(student, teacher, old, None, mask, k=2, alpha=1.0, logp_BT=cur)
    assert loss2[0].tolist() == pytest.approx([1.5 * rev, 2.0 * rev, 0.0], rel=1e-5)


@pytest.mark.parametrize("cap", [2.0, 1.25, 5.0])
def test_sdpo_objective_caps_the_rollout_importance_weight_at_sdpo_is_cap(cap):
    """The learner's SDPO loss: on-policy (current = old), so the weight that remains is the sampler->learner
    one, pi/q = 3 here, capped at ``sdpo.is_cap``: the per-token loss is min(3, cap) times the reverse KL over
    the top-2 + tail."""
    student = torch.log(torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]))
    teacher = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]))
    target = torch.tensor([[1]])
    sampler = token_logprobs(student, target) - math.log(3.0)
    aux = Aux(teacher_logits_BTV=teacher, route_sdpo_B=torch.ones(1))
    spec = spec_of("algorithm=sdpo", "sdpo.top_k=2", "sdpo.alpha=1.0", f"sdpo.is_cap={cap}")
    loss, count = token_loss(spec, student, target, torch.ones(1, 1), sampler, torch.zeros(1, 1), aux)
    rev = 0.4 * math.log(0.4 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.3 * math.log(0.3 / 0.7)
    assert loss.item() == pytest.approx(min(3.0, cap) * rev, rel=1e-5) and count.item() == 1.0


def test_sdpo_token_loss_descends_and_all_masked():
    # The student's top-3 {0, 3, 1} is clear of ties, so the support stays put over a small step.
    teacher = torch.tensor([[[2.0, 0.0, -1.0, 1.0, 0.5]]])
    student = torch.tensor([[[1.0, 0.0, -2.0, 0.8, -1.0]]], requires_grad=True)
    lp = torch.zeros(1, 1)
    loss, _ = sdpo_token_loss(student, teacher, lp, lp, torch.ones(1, 1), k=3)
    loss.sum().backward()
    with torch.no_grad():
        stepped = student - 0.2 * student.grad
        after, _ = sdpo_token_loss(stepped, teacher, lp, lp, torch.ones(1, 1), k=3)
        q = torch.softmax(teacher, -1)
        gap = lambda z: (torch.softmax(z, -1) - q).abs().sum()  # noqa: E731
    assert after.item() < loss.item() and gap(stepped) < gap(student.detach())
    z = torch.randn(2, 3, 5, requires_grad=True)
    loss, ent = sdpo_token_loss(
        z, torch.randn(2, 3, 5), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)
    )
    total = aggregate(loss, torch.zeros(2, 3))
    total.backward()
    assert total.item() == 0.0 and torch.isfinite(z.grad).all() and torch.equal(ent, torch.zeros(2, 3))


def test_ema_update_by_hand():
    teacher = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    student = torch.nn.Parameter(torch.tensor([3.0, 6.0]))
    storage = teacher.data_ptr()
    ema_update([teacher], [student], rate=0.25)  # 0.75 * t + 0.25 * s
    assert teacher.tolist() == pytest.approx([1.5, 3.0]) and teacher.data_ptr() == storage
    assert student.tolist() == [3.0, 6.0]
    with pytest.raises(ValueError):
        ema_update([teacher], [student, student])
