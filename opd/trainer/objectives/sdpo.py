"""SDPO: the student distils from itself shown a sibling's correct answer (the self-teacher, an EMA copy) (§3)."""

from __future__ import annotations

from opd.trainer.losses import token_logprobs
from opd.trainer.objectives import Objective, register
from opd.trainer.sdpo import sdpo_token_loss


def self_distillation_loss(spec, logits_BTV, targets_BT, mask_BT, sampler_BT, aux):
    """Per-token SDPO loss (not yet routed or weighted), shared with SRPO's SDPO branch."""
    logp_BT = token_logprobs(logits_BTV, targets_BT)
    loss_BT, _ = sdpo_token_loss(
        logits_BTV, aux.teacher_logits_BTV, logp_BT.detach(), sampler_BT, mask_BT,
        k=spec.sdpo_top_k, alpha=spec.sdpo_alpha, is_cap=spec.sdpo_is_cap, logp_BT=logp_BT,
        # On-policy the pi/pi_old ratio is 1, so the sampler->learner weight is the one sdpo.is_cap must bound.
        rollout_is_cap=spec.sdpo_is_cap,
    )
    return loss_BT, logp_BT


class SDPO(Objective):
    name = "sdpo"
    self_teacher = True
    min_group = 2  # siblings are the self-teacher's solutions
    routed_denominator = True

    def routes(self, has_teacher, correct):
        return ["sdpo" if t else "none" for t in has_teacher]

    def token_loss(self, spec, logits_BTV, targets_BT, mask_BT, sampler_BT, adv_BT, aux):
        loss_BT, _ = self_distillation_loss(spec, logits_BTV, targets_BT, mask_BT, sampler_BT, aux)
        z_sd = aux.route_sdpo_B.unsqueeze(-1) * mask_BT
        return loss_BT * z_sd, z_sd


register(SDPO())
