"""OPD with the task reward in one objective (verl's use_task_rewards, prime-rl's adv_tau, tinker's env reward
+ KL): each token's advantage is ``opd_reward.kl_weight * (log pi_T - log pi) + opd_reward.reward_weight *
A``,
``A`` the sample's GRPO group advantage from the verifiers' rewards; one clipped policy-gradient loss over
both. The teacher pulls every token towards itself; the reward moves whole answers that verify."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from opd.section import Section
from opd.trainer.objectives import TEACHER_SECTION, Objective, register

if TYPE_CHECKING:
    import torch

    from opd.trainer.objectives.loss import Aux
    from opd.trainer.objectives.spec import ObjectiveSpec


class OPDRewardConfig(Section):
    """algorithm=opd_reward: per-token advantage kl_weight * (log pi_T - log pi) + reward_weight * GRPO
    advantage."""

    kl_weight: float = Field(1.0, ge=0)
    reward_weight: float = Field(1.0, ge=0)


class OPDReward(Objective):
    name = "opd_reward"
    section = OPDRewardConfig
    teacher = "divergence"
    divergences = ("sampled",)  # the teacher's sampled-token advantage is added to the reward's
    tis_section = "opd"
    group_advantages = True
    min_group = 2

    def token_loss(self, spec: ObjectiveSpec, logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                   mask_BT: torch.Tensor, sampler_BT: torch.Tensor, adv_BT: torch.Tensor,
                   aux: Aux) -> tuple[torch.Tensor, torch.Tensor]:
        from opd.trainer.advantages import opd_token_advantages
        from opd.trainer.losses import token_logprobs
        from opd.trainer.objectives.loss import chunk_credit, pg_token_loss, teacher_logprobs

        logp_BT = token_logprobs(logits_BTV, targets_BT)
        kl_adv = chunk_credit(opd_token_advantages(logp_BT, teacher_logprobs(self.name, aux), mask_BT,
                                                   coef=spec[TEACHER_SECTION].kl_coef), aux.chunk_BT)
        adv = spec.own.kl_weight * kl_adv + spec.own.reward_weight * adv_BT * mask_BT
        return pg_token_loss(spec, logp_BT, sampler_BT, adv) * mask_BT, mask_BT


register(OPDReward())
