"""Objectives and modifiers added as modules: opd_reward (the teacher and the task reward in one loss), the
kl_ref penalty on any objective, and the pieces of DAPO's dynamic sampling."""

from __future__ import annotations

import pytest
import torch

from opd.config import ConfigError, load_config
from opd.plan import objective_spec, route_plan, spec_of
from opd.trainer.objectives.loss import Aux, token_loss
from opd.trainer.objectives.spec import ObjectiveSpec
from opd.trainer.routing import route
from opd.types import Prompt, Rewards, RolloutBatch, Sample, TeacherScores

LOGITS = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]], dtype=torch.float64)
TARGETS = torch.tensor([[0, 2]])
MASK = torch.ones(1, 2, dtype=torch.float64)
TEACHER = torch.tensor([[-0.2, -1.5]], dtype=torch.float64)


def _loss(spec: ObjectiveSpec, adv: float):
    logits = LOGITS.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1).gather(-1, TARGETS.unsqueeze(-1)).squeeze(-1)
    loss_BT, count_BT = token_loss(spec, logits, TARGETS, MASK, logp.detach(),
                                   torch.full((1, 2), adv, dtype=torch.float64),
                                   Aux(teacher_logp_BT=TEACHER))
    loss_BT.sum().backward()
    return loss_BT.detach(), count_BT, logits.grad


def test_loss_and_gradient_by_hand():
    """On-policy the clipped ratio is 1, so each token's loss is -A_t and its gradient -A_t * grad log
    pi(y_t), with A_t = kl_weight * (log pi_T - log pi) + reward_weight * A (here 2 * (log pi_T - log pi) + 3
    * 0.5)."""
    spec = spec_of("algorithm=opd_reward", "opd_reward.kl_weight=2.0", "opd_reward.reward_weight=3.0")
    loss, count, grad = _loss(spec, adv=0.5)
    logp = torch.log_softmax(LOGITS, -1).gather(-1, TARGETS.unsqueeze(-1)).squeeze(-1)
    a = 2.0 * (TEACHER - logp) + 3.0 * 0.5
    torch.testing.assert_close(loss, -a)
    assert torch.equal(count, MASK)
    # grad of log softmax at the target: onehot - softmax
    onehot = torch.nn.functional.one_hot(TARGETS, 3).to(torch.float64)
    torch.testing.assert_close(grad, -a.unsqueeze(-1) * (onehot - torch.softmax(LOGITS, -1)))


def test_each_weight_at_zero_is_the_other_objective():
    only_kl = _loss(spec_of("algorithm=opd_reward", "opd_reward.reward_weight=0.0"), adv=0.7)
    opd = _loss(spec_of("algorithm=opd", "opd.divergence=sampled"), adv=0.7)
    only_reward = _loss(spec_of("algorithm=opd_reward", "opd_reward.kl_weight=0.0"), adv=0.7)
    grpo = _loss(ObjectiveSpec(name="grpo"), adv=0.7)
    for got, want in ((only_kl, opd), (only_reward, grpo)):
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[2], want[2])


def _batch():
    prompt = Prompt("p0", "1+1=", [1, 2], "2")
    samples = [Sample(f"p0/s0/g{g}", prompt, g, [3, 4], "2" if g == 0 else "3", [-0.5, -0.6], 0)
               for g in range(2)]
    rewards = Rewards([s.uid for s in samples], [1.0, 0.0], [True, False], {"exact_answer": [1.0, 0.0]}, {},
                      0.0)
    scores = TeacherScores([s.uid for s in samples], [[-0.1, -0.2], [-0.3, -0.4]])
    return RolloutBatch(0, samples, 2, 0), rewards, scores


def test_config_route_and_spec():
    cfg = load_config("configs/demo.yaml", ["algorithm=opd_reward", "opd.divergence=sampled",
                                            "opd_reward.kl_weight=0.5", "rollout.group_size=2"])
    spec = objective_spec(cfg)
    assert (spec["opd_reward"].kl_weight, spec["opd_reward"].reward_weight) == (0.5, 1.0)
    assert cfg.teacher_signal.kind == "sampled" and cfg.needs_teacher
    batch = route(*_batch(), route_plan(cfg))
    # The router gives each sample its group advantage (rewards 1 and 0: +-1/std); the teacher's log-probs
    # ride along
    assert batch.advantages[0][0] == pytest.approx(-batch.advantages[1][0]) and batch.advantages[0][0] > 0.7
    assert batch.teacher_logprobs == [[-0.1, -0.2], [-0.3, -0.4]]
    with pytest.raises(ConfigError, match="opd_reward.*opd.divergence=sampled"):
        load_config("configs/demo.yaml", ["algorithm=opd_reward", "opd.divergence=teacher_topk"])
    with pytest.raises(ConfigError, match="algorithm: .*unknown objective 'ppo'; valid: .*opd_reward"):
        load_config("configs/demo.yaml", ["algorithm=ppo"])


@pytest.mark.parametrize("algorithm, cap", [("opd", 1.5), ("opd_reward", 1.5), ("exopd", 2.5), ("grpo", 3.5),
                                            ("srpo", 3.5), ("sdpo", 3.5)])
def test_each_objective_reads_the_tis_cap_of_its_own_section(algorithm, cap):
    cfg = load_config("configs/demo.yaml", [f"algorithm={algorithm}", "opd.divergence=sampled",
                                            "opd.tis_cap=1.5", "exopd.tis_cap=2.5", "grpo.tis_cap=3.5",
                                            "rollout.group_size=2"])
    assert objective_spec(cfg).tis_cap == cap


def test_kl_ref_penalty_adds_to_any_objective_over_its_counted_tokens():
    """kl_ref.coef * (log pi - log pi_ref) (k1) on each counted token, added to the objective's own loss, with
    the gradient coef * grad log pi; the reference's log-probs are constants."""
    ref = torch.tensor([[-0.9, -0.4]], dtype=torch.float64)
    logp = torch.log_softmax(LOGITS, -1).gather(-1, TARGETS.unsqueeze(-1)).squeeze(-1)
    onehot = torch.nn.functional.one_hot(TARGETS, 3).to(torch.float64)
    dlogp = onehot - torch.softmax(LOGITS, -1)
    for name in ("grpo", "opd_reward"):
        plain = _loss(ObjectiveSpec(name=name), adv=0.5)
        logits = LOGITS.clone().requires_grad_(True)
        spec = spec_of(f"algorithm={name}", "kl_ref.coef=0.1", "kl_ref.kind=k1")
        assert spec.needs_reference and not ObjectiveSpec(name=name).needs_reference
        loss_BT, count_BT = token_loss(spec, logits, TARGETS, MASK, logp.detach(),
                                       torch.full((1, 2), 0.5, dtype=torch.float64),
                                       Aux(teacher_logp_BT=TEACHER, ref_logp_BT=ref))
        loss_BT.sum().backward()
        torch.testing.assert_close(loss_BT.detach(), plain[0] + 0.1 * (logp - ref))
        torch.testing.assert_close(logits.grad, plain[2] + 0.1 * dlogp)
    with pytest.raises(ValueError, match="kl_ref.coef > 0 needs the reference"):
        token_loss(spec_of("algorithm=grpo", "kl_ref.coef=0.1"), LOGITS, TARGETS, MASK, logp,
                   torch.zeros(1, 2), Aux())
    cfg = load_config("configs/demo.yaml", ["algorithm=grpo", "kl_ref.coef=0.05",
                                            "kl_ref.reference=models/ref"])
    assert cfg.reference_dir == "models/ref" and objective_spec(cfg).kl_ref_coef == 0.05


def test_dynamic_sampling_pieces_by_hand():
    """The groups DAPO keeps (rewards not all equal) and a scored batch cut to some groups and joined
    again."""
    from opd.rollout.stream import Scored

    rollouts, rewards, scores = _batch()
    assert rewards.varied_groups(2) == [0]
    uniform = Rewards(rewards.uids, [1.0, 1.0], [True, True], {"exact_answer": [1.0, 1.0]}, {}, 0.0)
    assert uniform.varied_groups(2) == []
    scored = Scored(rollouts, rewards, scores)
    assert scored.groups([]).batch.samples == [] and scored.groups([]).scores.logprobs == []
    both = Scored.concat([scored, scored.groups([0])])
    assert ([s.uid for s in both.batch.samples] == both.rewards.uids == both.scores.uids
            == [s.uid for s in rollouts.samples] * 2)
    assert both.rewards.rewards == [1.0, 0.0, 1.0, 0.0] and both.scores.logprobs[2:] == scores.logprobs
