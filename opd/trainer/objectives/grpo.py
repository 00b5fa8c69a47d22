"""GRPO (and Dr.GRPO / DAPO's loss modes): verifier rewards, advantages relative to the prompt's group (§2).
Its section holds the policy-gradient settings every such objective shares (``PG_SECTION``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from opd.section import Section
from opd.trainer.objectives import Objective, register

if TYPE_CHECKING:
    import torch

    from opd.trainer.objectives.loss import Aux
    from opd.trainer.objectives.spec import ObjectiveSpec


class GRPOConfig(Section):
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.2, ge=0)
    norm_adv_by_std: bool = True  # False gives Dr.GRPO's mean-centred advantage
    adv_eps: float = Field(1e-6, gt=0)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    tis_cap: float = Field(2.0, gt=0)
    # every policy-gradient loss (grpo, sampled-token opd, exopd, srpo's GRPO branch, opd_reward): tis weighs
    # the gradient by min(pi/q, tis_cap); ppo clips the ratio pi/q itself, with dual_clip bounding negative
    # advantages
    ratio: Literal["tis", "ppo"] = "tis"
    dual_clip: float | None = Field(None, gt=1)

    @model_validator(mode="after")
    def _dual_clip_needs_ppo(self) -> GRPOConfig:
        if self.dual_clip is not None and self.ratio != "ppo":
            raise ValueError("grpo.dual_clip bounds the PPO ratio pi/q: set grpo.ratio=ppo "
                             "(with tis the ratio is 1)")
        return self


class GRPO(Objective):
    name = "grpo"
    section = GRPOConfig
    group_advantages = True
    min_group = 2  # a group of one has zero relative advantage
    sequence_agg = True

    def token_loss(self, spec: ObjectiveSpec, logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                   mask_BT: torch.Tensor, sampler_BT: torch.Tensor, adv_BT: torch.Tensor,
                   aux: Aux) -> tuple[torch.Tensor, torch.Tensor]:
        from opd.trainer.losses import token_logprobs
        from opd.trainer.objectives.loss import pg_token_loss

        return (pg_token_loss(spec, token_logprobs(logits_BTV, targets_BT), sampler_BT, adv_BT) * mask_BT,
                mask_BT)


register(GRPO())
