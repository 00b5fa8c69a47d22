"""SDPO: the student distils from itself shown a sibling's correct answer (the self-teacher, an EMA copy)
(§3). Its section holds the self-teacher's settings, which SRPO shares (``SELF_TEACHER_SECTION``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from opd.section import Section
from opd.trainer.objectives import SELF_TEACHER_ROUTE, Objective, register

if TYPE_CHECKING:
    import torch

    from opd.trainer.objectives.loss import Aux
    from opd.trainer.objectives.spec import ObjectiveSpec


class SDPOConfig(Section):
    # self-teacher <- (1-rate)*teacher + rate*student after each step
    ema_rate: float = Field(0.05, ge=0, le=1)
    top_k: int = Field(100, ge=1)  # student top-k support (+ tail bucket) of the JSD
    alpha: float = Field(0.5, ge=0, le=1)  # teacher weight of the JSD (0 forward KL, 1 reverse KL)
    # cap of the SDPO loss's importance weights (pi/pi_old and sampler->learner pi/q)
    is_cap: float = Field(2.0, gt=0)
    success_threshold: float = 1.0  # a sibling with reward >= this is a solution to show the self-teacher
    dont_reprompt_on_self_success: bool = True
    max_reprompt_len: int = Field(256, ge=8)  # self-teacher prompt tokens; longer ones are cut on the right


def self_distillation_loss(spec, logits_BTV, targets_BT, mask_BT, sampler_BT, aux):
    """Per-token SDPO loss (not yet routed or weighted), shared with SRPO's SDPO branch."""
    from opd.trainer.losses import token_logprobs
    from opd.trainer.sdpo import sdpo_token_loss

    st = spec.self_teacher_settings
    logp_BT = token_logprobs(logits_BTV, targets_BT)
    loss_BT, _ = sdpo_token_loss(
        logits_BTV, aux.teacher_logits_BTV, logp_BT.detach(), sampler_BT, mask_BT,
        k=st.top_k, alpha=st.alpha, is_cap=st.is_cap, logp_BT=logp_BT,
        # On-policy the pi/pi_old ratio is 1, so the sampler->learner weight is the one sdpo.is_cap must
        # bound.
        rollout_is_cap=st.is_cap,
    )
    return loss_BT, logp_BT


class SDPO(Objective):
    name = "sdpo"
    section = SDPOConfig
    self_teacher = True
    min_group = 2  # siblings are the self-teacher's solutions
    routed_denominator = True

    def routes(self, has_teacher, correct):
        return [SELF_TEACHER_ROUTE if t else "none" for t in has_teacher]

    def token_loss(self, spec: ObjectiveSpec, logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                   mask_BT: torch.Tensor, sampler_BT: torch.Tensor, adv_BT: torch.Tensor,
                   aux: Aux) -> tuple[torch.Tensor, torch.Tensor]:
        loss_BT, _ = self_distillation_loss(spec, logits_BTV, targets_BT, mask_BT, sampler_BT, aux)
        z_sd = aux.route_sdpo_B.unsqueeze(-1) * mask_BT
        return loss_BT * z_sd, z_sd


register(SDPO())
