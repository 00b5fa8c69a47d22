"""SRPO: correct samples learn by GRPO, failed ones with a self-teacher by SDPO, over one denominator (§5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from opd.section import Section
from opd.trainer.objectives import SELF_TEACHER_ROUTE, Objective, register
from opd.trainer.objectives.sdpo import self_distillation_loss

if TYPE_CHECKING:
    import torch

    from opd.trainer.objectives.loss import Aux
    from opd.trainer.objectives.spec import ObjectiveSpec


class SRPOConfig(Section):
    entropy_beta: float = Field(1.0, ge=0)  # weight exp(-beta * H_teacher) on SDPO tokens


class SRPO(Objective):
    name = "srpo"
    section = SRPOConfig
    group_advantages = True
    self_teacher = True
    min_group = 2
    entropy_weighted = True

    def routes(self, has_teacher, correct):
        return [SELF_TEACHER_ROUTE if t and not c else "grpo"
                for t, c in zip(has_teacher, correct, strict=True)]  # §5.1

    def token_loss(self, spec: ObjectiveSpec, logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                   mask_BT: torch.Tensor, sampler_BT: torch.Tensor, adv_BT: torch.Tensor,
                   aux: Aux) -> tuple[torch.Tensor, torch.Tensor]:
        from opd.trainer.objectives.loss import pg_token_loss

        sd_loss_BT, logp_BT = self_distillation_loss(spec, logits_BTV, targets_BT, mask_BT, sampler_BT, aux)
        z_sd = aux.route_sdpo_B.unsqueeze(-1) * mask_BT
        z_g = (1.0 - aux.route_sdpo_B).unsqueeze(-1) * mask_BT
        g_loss_BT = pg_token_loss(spec, logp_BT, sampler_BT, adv_BT)
        return z_g * g_loss_BT + z_sd * aux.entropy_weights_BT * sd_loss_BT, mask_BT


register(SRPO())
