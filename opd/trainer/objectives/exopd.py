"""G-OPD / ExOPD: OPD's reward extrapolated past the teacher along reference -> teacher (§4), lambda =
exopd.lam."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from opd.section import Section
from opd.trainer.objectives import Objective, register

if TYPE_CHECKING:
    import torch

    from opd.trainer.objectives.loss import Aux
    from opd.trainer.objectives.spec import ObjectiveSpec


class ExOPDConfig(Section):
    lam: float = Field(1.25, gt=0)  # reward scale; 1.0 is exactly OPD, >1 extrapolates past the teacher
    reference: str | None = None  # reference model dir; None: the student's initial weights
    tis_cap: float = Field(2.0, gt=0)


class ExOPD(Objective):
    name = "exopd"
    section = ExOPDConfig
    teacher = "sampled"  # the sampled token's log-prob, whatever opd.divergence says
    tis_section = "exopd"
    reference = True
    token_selection = True

    def token_loss(self, spec: ObjectiveSpec, logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                   mask_BT: torch.Tensor, sampler_BT: torch.Tensor, adv_BT: torch.Tensor,
                   aux: Aux) -> tuple[torch.Tensor, torch.Tensor]:
        from opd.trainer.advantages import gopd_token_advantages
        from opd.trainer.losses import token_logprobs
        from opd.trainer.objectives.loss import chunk_credit, pg_token_loss, teacher_logprobs

        logp_BT = token_logprobs(logits_BTV, targets_BT)
        adv = chunk_credit(gopd_token_advantages(teacher_logprobs(self.name, aux), aux.ref_logp_BT, logp_BT,
                                                 mask_BT, lam=spec.own.lam), aux.chunk_BT)
        return pg_token_loss(spec, logp_BT, sampler_BT, adv) * mask_BT, mask_BT


register(ExOPD())
