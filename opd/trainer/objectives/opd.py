"""OPD: the student learns from the teacher on its own samples (§1). ``opd.divergence`` picks the signal: the
sampled token's reverse KL as a policy-gradient advantage, the forward KL over the teacher's top-k (+ tail), or
an exact divergence over the whole vocabulary."""

from __future__ import annotations

import torch

from opd.trainer.advantages import opd_token_advantages
from opd.trainer.divergences import full_vocab_divergence, teacher_topk_forward_kl
from opd.trainer.losses import prefix_is_weights, token_logprobs
from opd.trainer.objectives import Objective, pg_token_loss, register, teacher_logprobs


class OPD(Objective):
    name = "opd"
    tis_section = "opd"
    token_selection = True

    def token_loss(self, spec, logits_BTV, targets_BT, mask_BT, sampler_BT, adv_BT, aux):
        logp_BT = token_logprobs(logits_BTV, targets_BT)
        if spec.opd_divergence == "sampled":
            # The advantage takes the learner's log pi, not the sampler's log q: with the truncated weight pi/q the
            # expected gradient is then grad KL(pi || pi_T) even when q != pi (stale weights, another engine).
            adv = opd_token_advantages(logp_BT, teacher_logprobs(self.name, aux), mask_BT, coef=spec.opd_kl_coef)
            return pg_token_loss(spec, logp_BT, sampler_BT, adv) * mask_BT, mask_BT
        if spec.opd_divergence == "teacher_topk":
            div = teacher_topk_forward_kl(torch.log_softmax(logits_BTV.float(), -1), aux.topk_ids_BTK, aux.topk_logp_BTK)
        elif spec.opd_divergence == "full_vocab":
            div = full_vocab_divergence(logits_BTV, aux.teacher_logits_BTV, mask_BT, kind=spec.full_vocab_kind, beta=spec.jsd_beta)
        else:
            raise ValueError(f"unknown opd.divergence {spec.opd_divergence!r}")
        # The divergence is taken at states the sampler visited: those of an older policy (max_staleness >= 1), or
        # of an engine whose numerics differ, are reweighted towards the states the learner's policy would visit.
        return div * prefix_is_weights(logp_BT, sampler_BT, mask_BT, spec.tis_cap) * mask_BT, mask_BT


register(OPD())
