"""GRPO (and Dr.GRPO / DAPO's loss modes): verifier rewards, advantages relative to the prompt's group (§2)."""

from __future__ import annotations

from opd.trainer.losses import token_logprobs
from opd.trainer.objectives import Objective, pg_token_loss, register


class GRPO(Objective):
    name = "grpo"
    group_advantages = True
    min_group = 2  # a group of one has zero relative advantage
    sequence_agg = True

    def token_loss(self, spec, logits_BTV, targets_BT, mask_BT, sampler_BT, adv_BT, aux):
        return pg_token_loss(spec, token_logprobs(logits_BTV, targets_BT), sampler_BT, adv_BT) * mask_BT, mask_BT


register(GRPO())
