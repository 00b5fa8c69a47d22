"""grpo.ratio / grpo.dual_clip: the policy-gradient loss every PG objective shares, against the sampler q."""

from __future__ import annotations

import math

import pytest
import torch

from opd.config import ConfigError, load_config
from opd.plan import objective_spec, spec_of
from opd.trainer.objectives.loss import Aux, token_loss
from opd.trainer.objectives.spec import ObjectiveSpec

LOGITS = torch.tensor([[[0.3, -0.2, 1.0], [0.0, 0.4, -0.7], [1.5, 0.2, 0.1], [-0.4, 0.9, 0.3]]],
                      dtype=torch.float64)
TARGETS = torch.tensor([[2, 1, 0, 1]])
MASK = torch.ones(1, 4, dtype=torch.float64)
# pi/q per token: in range (1.1), above the clip (1.5), far above it (5: dual-clip territory), below the clip
# (0.5)
RATIOS = torch.tensor([[1.1, 1.5, 5.0, 0.5]], dtype=torch.float64)
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)


def _run(spec: ObjectiveSpec):
    logits = LOGITS.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1).gather(-1, TARGETS.unsqueeze(-1)).squeeze(-1)
    sampler = logp.detach() - torch.log(RATIOS)
    loss_BT, _ = token_loss(spec, logits, TARGETS, MASK, sampler, ADV, Aux())
    loss_BT.sum().backward()
    return loss_BT.detach(), logits.grad


def _dlogp(t: int) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(TARGETS[0, t], 3).to(torch.float64)
    return onehot - torch.softmax(LOGITS[0, t], -1)


def test_ppo_ratio_against_the_sampler_clips_and_dual_clips_by_hand():
    loss, grad = _run(spec_of("algorithm=grpo", "grpo.ratio=ppo", "grpo.clip_low=0.2", "grpo.clip_high=0.2",
                              "grpo.dual_clip=3.0"))
    # -min(rho*A, clip(rho)*A); for A < 0 then min(that, -3*A)
    torch.testing.assert_close(loss, torch.tensor([[-1.1, -1.2, 3.0, 0.8]], dtype=torch.float64))
    # only the in-range token pulls: d(-rho*A)/dlogits = -A * rho * dlogp; the clipped ones give nothing
    torch.testing.assert_close(grad[0, 0], -1.0 * 1.1 * _dlogp(0))
    assert torch.count_nonzero(grad[0, 1:]) == 0


def test_without_dual_clip_the_far_token_loss_is_unbounded_and_tis_weighs_instead():
    loss, _ = _run(spec_of("algorithm=grpo", "grpo.ratio=ppo"))
    assert loss[0, 2] == pytest.approx(5.0)  # -min(-5, -1.2): the stale token's loss grows with its ratio
    loss, grad = _run(spec_of("algorithm=grpo", "grpo.ratio=tis", "grpo.tis_cap=2.0"))
    # tis: the surrogate's ratio is 1 and each token is weighted min(rho, 2): loss -A * w, gradient -A * w *
    # dlogp
    w = RATIOS.clamp(max=2.0)
    torch.testing.assert_close(loss, -ADV * w)
    for t in range(4):
        torch.testing.assert_close(grad[0, t], -ADV[0, t] * w[0, t] * _dlogp(t))


def test_config_wires_and_checks_the_ratio():
    spec = objective_spec(load_config("configs/demo.yaml",
                                      ["algorithm=grpo", "grpo.ratio=ppo", "grpo.dual_clip=3.0"]))
    assert (spec.ratio, spec.dual_clip) == ("ppo", 3.0)
    with pytest.raises(ConfigError, match="grpo.dual_clip bounds the PPO ratio"):
        load_config("configs/demo.yaml", ["grpo.dual_clip=3.0"])
    with pytest.raises(ConfigError, match="grpo.dual_clip"):
        load_config("configs/demo.yaml", ["grpo.ratio=ppo", "grpo.dual_clip=0.5"])
    assert math.isclose(objective_spec(load_config("configs/demo.yaml", [])).tis_cap, 2.0)
