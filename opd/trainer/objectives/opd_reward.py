"""OPD with the task reward in one objective (verl's use_task_rewards, prime-rl's adv_tau, tinker's env reward
+ KL): each token's advantage is ``opd_reward.kl_weight * (log pi_T - log pi) + opd_reward.reward_weight * A``,
``A`` the sample's GRPO group advantage from the verifiers' rewards; one clipped policy-gradient loss over both.
The teacher pulls every token towards itself; the reward moves whole answers that verify."""

from __future__ import annotations

from opd.trainer.advantages import opd_token_advantages
from opd.trainer.losses import token_logprobs
from opd.trainer.objectives import Objective, pg_token_loss, register, teacher_logprobs


class OPDReward(Objective):
    name = "opd_reward"
    tis_section = "opd"
    group_advantages = True
    min_group = 2

    def token_loss(self, spec, logits_BTV, targets_BT, mask_BT, sampler_BT, adv_BT, aux):
        logp_BT = token_logprobs(logits_BTV, targets_BT)
        kl_adv = opd_token_advantages(logp_BT, teacher_logprobs(self.name, aux), mask_BT, coef=spec.opd_kl_coef)
        adv = spec.opd_reward_kl_weight * kl_adv + spec.opd_reward_reward_weight * adv_BT * mask_BT
        return pg_token_loss(spec, logp_BT, sampler_BT, adv) * mask_BT, mask_BT


register(OPDReward())
