"""Losses and advantages against values computed by hand from reference/algorithms.md §0–2."""

import math

import pytest
import torch

from opd.plan import spec_of
from opd.trainer.advantages import grpo_advantages, opd_token_advantages
from opd.trainer.losses import (
    aggregate,
    clipped_pg_loss,
    entropy_from_logits,
    prefix_is_weights,
    token_logprobs,
    truncated_is_weights,
)
from opd.trainer.objectives.loss import Aux, token_loss

L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
M = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode,kwargs,expected",
    [
        ("token-mean", {}, (1 + 2 + 3 + 4) / 4),
        ("seq-mean-token-mean", {}, ((1 + 2 + 3) / 3 + 4 / 1) / 2),
        ("seq-mean-token-sum-norm", {"norm_len": 4}, 10 / (2 * 4)),
        ("token-sum", {}, 10.0),
    ],
)
def test_aggregate_modes(mode, kwargs, expected):
    assert aggregate(L, M, mode, **kwargs).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm",
                                  "token-sum"])
def test_all_masked_batch_gives_zero_not_nan(mode):
    x = torch.randn(2, 3, requires_grad=True)
    out = aggregate(x, torch.zeros(2, 3), mode)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() == 0


def test_unknown_aggregation_names_valid_modes():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(L, M, "mean-of-nothing")


def _pg(logp, old, adv, **kw):
    t = lambda v: torch.tensor([[v]])  # noqa: E731
    return clipped_pg_loss(t(math.log(logp)), t(math.log(old)), t(adv), torch.ones(1, 1), **kw)[0].item()


def test_ppo_clip_by_hand():
    # ratio 0.5/0.4 = 1.25; eps 0.2 clips it to 1.2 for a positive advantage (min picks the clipped term).
    assert _pg(0.5, 0.4, 1.0) == pytest.approx(-1.2)
    # negative advantage: min(-1.25, -1.2) = -1.25, so the unclipped term wins and the loss is 1.25.
    assert _pg(0.5, 0.4, -1.0) == pytest.approx(1.25)
    # clip-higher (DAPO): eps_high 0.28 leaves ratio 1.25 unclipped.
    assert _pg(0.5, 0.4, 1.0, clip_high=0.28) == pytest.approx(-1.25)
    # ratio 5 with A=-1 gives loss 5; dual clip c=3 caps it at 3.
    assert _pg(0.5, 0.1, -1.0) == pytest.approx(5.0)
    assert _pg(0.5, 0.1, -1.0, dual_clip=3.0) == pytest.approx(3.0)


def test_on_policy_gradient_is_minus_advantage_times_grad_logp():
    logits = torch.tensor([[[0.3, -0.2, 0.1]]], requires_grad=True)
    target = torch.tensor([[0]])
    logp = token_logprobs(logits, target)
    loss, stats = clipped_pg_loss(logp, logp.detach(), torch.tensor([[0.7]]), torch.ones(1, 1))
    loss.backward()
    p = torch.softmax(logits.detach()[0, 0], -1)
    expected = -0.7 * (torch.nn.functional.one_hot(torch.tensor(0), 3).float() - p)
    assert torch.allclose(logits.grad[0, 0], expected, atol=1e-6)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0


def test_token_weights_scale_per_token_loss():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    loss, _ = clipped_pg_loss(logp, logp, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2),
                              token_weights_BT=torch.tensor([[2.0, 0.0]]))
    assert loss.item() == pytest.approx(-(2.0 * 1 + 0.0) / 2)


def test_truncated_is_weights():
    w = truncated_is_weights(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), cap=2.0)
    assert w.tolist() == pytest.approx([2.0, math.exp(-1.0)])


def test_grpo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of {1,0,0,1}
    adv = grpo_advantages(r, eps=0.0)
    assert adv[0].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert adv[1].tolist() == [0.0] * 4  # uniform group: no signal, no NaN
    assert grpo_advantages(r, norm_by_std=False)[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert grpo_advantages(torch.tensor([[1.0]])).tolist() == [[0.0]]


def test_opd_advantage_is_negative_sampled_reverse_kl():
    s = torch.tensor([[-1.0, -2.0, -0.1]])  # the learner's log pi(y_t)
    tau = torch.tensor([[-0.5, -3.0, -9.0]])  # teacher log pi_T(y_t)
    m = torch.tensor([[1.0, 1.0, 0.0]])
    adv = opd_token_advantages(s, tau, m, coef=2.0)
    assert adv[0].tolist() == pytest.approx([2.0 * 0.5, 2.0 * -1.0, 0.0])


@pytest.mark.parametrize("teacher_logp,direction", [(-0.1, +1), (-5.0, -1)])
def test_opd_step_moves_student_toward_teacher(teacher_logp, direction):
    """One SGD step on the OPD loss raises the drawn token's prob when the teacher likes it more, and vice
    versa."""
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    target = torch.tensor([[2]])
    before = token_logprobs(logits, target).detach()
    adv = opd_token_advantages(before, torch.tensor([[teacher_logp]]), torch.ones(1, 1))
    logp = token_logprobs(logits, target)
    loss, _ = clipped_pg_loss(logp, logp.detach(), adv, torch.ones(1, 1))
    loss.backward()
    with torch.no_grad():
        after = token_logprobs(logits - 0.5 * logits.grad, target)
    assert direction * (after - before).item() > 0


def test_entropy_and_logprobs_of_uniform_logits():
    logits = torch.zeros(2, 3, 5)
    assert torch.allclose(entropy_from_logits(logits), torch.full((2, 3), math.log(5)))
    assert torch.allclose(token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long)),
                          torch.full((2, 3), -math.log(5)))


def test_prefix_is_weights():
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    sampler = logp - torch.tensor([[math.log(1.5), -math.log(2.0), 9.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = prefix_is_weights(logp, sampler, mask, cap=2.0)
    assert w[0].tolist() == pytest.approx([1.0, 1.5, 0.75, 2.0])  # y_<t's ratio; the last one capped


@pytest.mark.parametrize("divergence", ["teacher_topk", "full_vocab"])
def test_opd_divergences_are_weighted_by_the_prefix_is_weight(divergence):
    """Stale samples: position t's divergence is scaled by the truncated ratio of y_<t, a detached
    constant."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, requires_grad=True)
    teacher = torch.randn(2, 3, 7)
    targets = torch.randint(7, (2, 3))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    top = teacher.log_softmax(-1).topk(3, dim=-1)
    aux = Aux(topk_ids_BTK=top.indices, topk_logp_BTK=top.values, teacher_logits_BTV=teacher)
    spec = spec_of(f"opd.divergence={divergence}", "opd.tis_cap=2.0", "teacher.top_k=3")
    logp = token_logprobs(logits, targets).detach()
    on_policy, count = token_loss(spec, logits, targets, mask, logp, None, aux)
    log_ratio = torch.tensor([[0.0, math.log(1.5), 3.0], [5.0, -math.log(2.0), 0.0]])
    stale, _ = token_loss(spec, logits, targets, mask, logp - log_ratio, None, aux)
    w = torch.tensor([[1.0, 1.0, 1.5], [1.0, 2.0, 2.0]])  # exp(5) and exp(5 - log 2) capped at 2
    assert torch.equal(count, mask) and on_policy[0, 2] == 0
    assert torch.allclose(stale, on_policy * w, atol=1e-6)
    got = torch.autograd.grad(stale.sum(), logits)[0]
    want = torch.autograd.grad((on_policy * w).sum(), logits)[0]
    assert torch.allclose(got, want, atol=1e-6)  # the weight is a constant: no gradient through it
