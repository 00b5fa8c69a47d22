"""OPD: the student learns from the teacher on its own samples (§1). ``opd.divergence`` picks the signal: the
sampled token's reverse KL as a policy-gradient advantage, the forward KL over the teacher's top-k (+ tail),
or an exact divergence over the whole vocabulary. Its section also holds the teacher settings every objective
that reads a teacher follows (``TEACHER_SECTION``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from opd.section import Section
from opd.trainer.objectives import Objective, register

if TYPE_CHECKING:
    import torch

    from opd.trainer.objectives.loss import Aux
    from opd.trainer.objectives.spec import ObjectiveSpec


class OPDConfig(Section):
    # advantage = -kl_coef * (log pi - log pi_T) per token, pi the learner's
    kl_coef: float = Field(1.0, gt=0)
    tis_cap: float = Field(2.0, gt=0)  # cap of the sampler->learner importance ratio
    # uld: Universal Logit Distillation, the L1 distance between the student's and the teacher's top-k
    # probabilities each sorted (no token ids compared: a teacher of another tokenizer needs no mapping)
    divergence: Literal["sampled", "teacher_topk", "uld", "full_vocab"] = "sampled"
    full_vocab_kind: Literal["reverse", "forward", "jsd"] = "reverse"
    jsd_beta: float = Field(0.5, ge=0, le=1)  # teacher weight of the generalised JSD
    # full_vocab: where the teacher's distribution comes from. learner: an HF forward of the teacher in the
    # learner; teacher: the teacher actor (transformers) runs the teacher's trunk as each chunk of samples is
    # generated and sends its final hidden states at the response positions (H floats per token, not V); the
    # learner applies the teacher's LM head piece by piece. Same loss; the teacher's forward leaves the
    # learner
    full_vocab_source: Literal["learner", "teacher"] = "learner"


class OPD(Objective):
    name = "opd"
    section = OPDConfig
    teacher = "divergence"
    divergences = ("sampled", "teacher_topk", "uld", "full_vocab")
    tis_section = "opd"
    token_selection = True

    def token_loss(self, spec: ObjectiveSpec, logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                   mask_BT: torch.Tensor, sampler_BT: torch.Tensor, adv_BT: torch.Tensor,
                   aux: Aux) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from opd.trainer.advantages import opd_token_advantages
        from opd.trainer.divergences import full_vocab_divergence, sorted_topk_l1, teacher_topk_forward_kl
        from opd.trainer.losses import prefix_is_weights, token_logprobs
        from opd.trainer.objectives.loss import chunk_credit, pg_token_loss, teacher_logprobs

        o = spec.own
        logp_BT = token_logprobs(logits_BTV, targets_BT)
        if o.divergence == "sampled":
            # The advantage takes the learner's log pi, not the sampler's log q: with the truncated weight
            # pi/q the expected gradient is then grad KL(pi || pi_T) even when q != pi (stale weights, another
            # engine).
            adv = chunk_credit(opd_token_advantages(logp_BT, teacher_logprobs(self.name, aux), mask_BT,
                                                    coef=o.kl_coef), aux.chunk_BT)
            return pg_token_loss(spec, logp_BT, sampler_BT, adv) * mask_BT, mask_BT
        if o.divergence == "teacher_topk":
            div = teacher_topk_forward_kl(torch.log_softmax(logits_BTV.float(), -1), aux.topk_ids_BTK,
                                          aux.topk_logp_BTK)
        elif o.divergence == "uld":
            div = sorted_topk_l1(torch.log_softmax(logits_BTV.float(), -1), aux.topk_logp_BTK)
        else:
            div = full_vocab_divergence(logits_BTV, aux.teacher_logits_BTV, mask_BT, kind=o.full_vocab_kind,
                                        beta=o.jsd_beta)
        # The divergence is taken at states the sampler visited: those of an older policy (max_staleness >=
        # 1), or of an engine whose numerics differ, are reweighted towards the states the learner's policy
        # would visit. A teacher of another tokenizer gives top-k rows at chunk starts only: the divergence
        # counts there.
        taught_BT = mask_BT if aux.topk_rows_BT is None else mask_BT * aux.topk_rows_BT
        return div * prefix_is_weights(logp_BT, sampler_BT, mask_BT, spec.tis_cap) * taught_BT, taught_BT


register(OPD())
