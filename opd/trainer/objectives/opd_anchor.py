"""OPD anchored to a reference: the sampled token's teacher reward with a KL penalty to a frozen reference
folded into
it, the way OpenRLHF (``init_kl_coef``) and verl (``use_kl_in_reward``) put the reference's KL into the
reward:

    A_t = -opd.kl_coef * (log pi(y_t) - log pi_T(y_t)) - opd_anchor.beta * (log pi(y_t) - log pi_ref(y_t))

as a detached advantage in the policy-gradient loss with the truncated weight min(pi/q, opd.tis_cap); ``beta =
0`` is sampled-token OPD exactly. The anchor keeps the student near where it started (or near
``opd_anchor.reference``) while it moves towards the teacher; unlike ``kl_ref`` (a penalty added to any
objective's loss) it shapes the reward each token's log-prob is pushed by. Up to a scale it is G-OPD's
interpolation: dividing by 1 + beta gives
``exopd.lam = 1 / (1 + beta)``, which Adam nearly undoes (its updates ignore a constant scale of the
gradient).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from opd.section import Section
from opd.trainer.objectives import TEACHER_SECTION, Objective, register

if TYPE_CHECKING:
    import torch

    from opd.trainer.objectives.loss import Aux
    from opd.trainer.objectives.spec import ObjectiveSpec


class OPDAnchorConfig(Section):
    beta: float = Field(0.1, ge=0)  # weight of the reference's term in each token's reward; 0 is exactly OPD
    reference: str | None = None  # reference model dir; None: the student's initial weights


class OPDAnchor(Objective):
    name = "opd_anchor"
    section = OPDAnchorConfig
    teacher = "sampled"  # the sampled token's log-prob, whatever opd.divergence says
    reference = True
    tis_section = TEACHER_SECTION

    def token_loss(self, spec: ObjectiveSpec, logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                   mask_BT: torch.Tensor, sampler_BT: torch.Tensor, adv_BT: torch.Tensor,
                   aux: Aux) -> tuple[torch.Tensor, torch.Tensor]:
        from opd.trainer.advantages import opd_token_advantages
        from opd.trainer.losses import token_logprobs
        from opd.trainer.objectives.loss import chunk_credit, pg_token_loss, teacher_logprobs

        logp_BT = token_logprobs(logits_BTV, targets_BT)
        adv = chunk_credit(opd_token_advantages(logp_BT, teacher_logprobs(self.name, aux), mask_BT,
                                                coef=spec[TEACHER_SECTION].kl_coef), aux.chunk_BT)
        if spec.own.beta:
            adv = adv - spec.own.beta * (logp_BT.detach() - aux.ref_logp_BT) * mask_BT
        return pg_token_loss(spec, logp_BT, sampler_BT, adv) * mask_BT, mask_BT


register(OPDAnchor())
