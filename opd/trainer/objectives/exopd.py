"""G-OPD / ExOPD: OPD's reward extrapolated past the teacher along reference -> teacher (§4), lambda = exopd.lam."""

from __future__ import annotations

from opd.trainer.advantages import gopd_token_advantages
from opd.trainer.losses import token_logprobs
from opd.trainer.objectives import Objective, pg_token_loss, register, teacher_logprobs


class ExOPD(Objective):
    name = "exopd"
    tis_section = "exopd"
    reference = True
    token_selection = True

    def token_loss(self, spec, logits_BTV, targets_BT, mask_BT, sampler_BT, adv_BT, aux):
        logp_BT = token_logprobs(logits_BTV, targets_BT)
        adv = gopd_token_advantages(teacher_logprobs(self.name, aux), aux.ref_logp_BT, logp_BT, mask_BT, lam=spec.exopd_lam)
        return pg_token_loss(spec, logp_BT, sampler_BT, adv) * mask_BT, mask_BT


register(ExOPD())
