"""The torch side of the objectives: the teacher-side tensors of a micro-batch (``Aux``), the policy-gradient
loss the policy-gradient objectives share, and ``token_loss``, which hands a micro-batch to the objective's
own module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd.trainer.divergences import kl_penalty
from opd.trainer.losses import clipped_pg_token_loss, token_logprobs, truncated_is_weights
from opd.trainer.objectives import get
from opd.trainer.objectives.spec import ObjectiveSpec


def _at(t: torch.Tensor | None, piece: tuple) -> torch.Tensor | None:
    return None if t is None else t[piece]


@dataclass
class Aux:
    """Per-micro-batch tensors computed without gradient before the learning pass (teacher/reference side).

    A teacher's full distribution is never held for the whole micro-batch: ``teacher_head`` computes it for
    one piece (``opd.trainer.chunks``) from the teacher's hidden states, and ``piece`` fills
    ``teacher_logits_BTV`` with it for the loss of that piece only."""

    teacher_logp_BT: torch.Tensor | None = None  # scored by the teacher server (or the learner's HF teacher)
    topk_ids_BTK: torch.Tensor | None = None
    topk_logp_BTK: torch.Tensor | None = None
    ref_logp_BT: torch.Tensor | None = None  # ExOPD reference model
    # one piece's HF-teacher / listed-vocabulary / self-teacher logits
    teacher_logits_BTV: torch.Tensor | None = None
    teacher_head: Callable[[tuple], torch.Tensor] | None = None  # piece -> that piece's teacher logits
    route_sdpo_B: torch.Tensor | None = None  # SRPO/SDPO: 1 where the sample learns from the self-teacher
    entropy_weights_BT: torch.Tensor | None = None  # SRPO exp(-beta*H) normalised over SDPO tokens
    # a teacher with another tokenizer: each response token's byte-aligned chunk, -1 where none (long), and
    # 1 where a token has a top-k row (a chunk's first token)
    chunk_BT: torch.Tensor | None = None
    topk_rows_BT: torch.Tensor | None = None

    def piece(self, p: tuple) -> Aux:
        """The tensors of one piece of the micro-batch, with that piece's teacher logits computed."""
        return Aux(
            teacher_logp_BT=_at(self.teacher_logp_BT, p), topk_ids_BTK=_at(self.topk_ids_BTK, p),
            topk_logp_BTK=_at(self.topk_logp_BTK, p), ref_logp_BT=_at(self.ref_logp_BT, p),
            teacher_logits_BTV=self.teacher_head(p) if self.teacher_head is not None else None,
            route_sdpo_B=_at(self.route_sdpo_B, p[:1]), entropy_weights_BT=_at(self.entropy_weights_BT, p),
            chunk_BT=_at(self.chunk_BT, p), topk_rows_BT=_at(self.topk_rows_BT, p),
        )


def pg_token_loss(spec: ObjectiveSpec, logp_BT: torch.Tensor, sampler_BT: torch.Tensor,
                  adv_BT: torch.Tensor) -> torch.Tensor:
    """Per-token policy-gradient loss against the sampler q, as ``grpo.ratio`` says.

    ``tis``: the surrogate's ratio is pi over its detached self (1: one update per batch), and the truncated
    weight min(pi/q, tis_cap) corrects for q != pi. ``ppo``: the ratio is pi/q itself, PPO-clipped to [1 -
    clip_low, 1 + clip_high], with ``grpo.dual_clip`` c bounding a negative advantage's loss at -c*A (Ye et
    al. 2020): stale or mismatched tokens stop pulling once outside the trust region instead of being
    re-weighted."""
    if spec.ratio == "ppo":
        loss_BT, _, _ = clipped_pg_token_loss(logp_BT, sampler_BT, adv_BT, clip_low=spec.clip_low,
                                              clip_high=spec.clip_high, dual_clip=spec.dual_clip)
        return loss_BT
    w_BT = truncated_is_weights(logp_BT, sampler_BT, spec.tis_cap)
    loss_BT, _, _ = clipped_pg_token_loss(
        logp_BT, logp_BT.detach(), adv_BT, clip_low=spec.clip_low, clip_high=spec.clip_high,
        token_weights_BT=w_BT
    )
    return loss_BT


def chunk_credit(adv_BT: torch.Tensor, chunk_BT: torch.Tensor | None) -> torch.Tensor:
    """Every token's advantage replaced by the sum over its chunk (a teacher with another tokenizer,
    ``opd.teacher.cross``): with the teacher's chunk log-prob on one token of the chunk, the per-token OPD
    advantages of a chunk sum to ``-coef * (l_S(c) - l_T(c))``, which each of its tokens then carries (ExOPD's
    likewise, the reference's log-probs summed with the student's). 0 where a token has no chunk. Chunks of
    one token leave the advantages as they are, bit for bit (a sum of one term). Whole sequences per row: the
    learner never cuts a row into pieces here (token selection is refused with such a teacher)."""
    if chunk_BT is None:
        return adv_BT
    b, t = chunk_BT.shape
    scored = chunk_BT >= 0
    # chunk c of row r goes to slot r * t + c; unscored tokens to one spare slot at the end
    slot = torch.where(scored, chunk_BT + t * torch.arange(b, device=chunk_BT.device).unsqueeze(1), b * t)
    sums = torch.zeros(b * t + 1, dtype=adv_BT.dtype, device=adv_BT.device)
    sums.index_add_(0, slot.flatten(), adv_BT.flatten())
    return torch.where(scored, sums[slot], torch.zeros_like(adv_BT))


def teacher_logprobs(name: str, aux: Aux) -> torch.Tensor:
    if aux.teacher_logp_BT is None:
        raise ValueError(f"{name} needs the teacher's per-token log-probs, and the batch carries none")
    return aux.teacher_logp_BT


def token_loss(
    spec: ObjectiveSpec, logits_BTV: torch.Tensor, targets_BT: torch.Tensor, mask_BT: torch.Tensor,
    sampler_BT: torch.Tensor, adv_BT: torch.Tensor, aux: Aux
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, denominator tokens) for one micro-batch, from ``spec.name``'s module in
    ``opd.trainer.objectives``, plus ``kl_ref.coef`` times the per-token KL to the reference model on the
    tokens the objective counts (so it shares the objective's denominator, whichever objective it is)."""
    loss_BT, count_BT = get(spec.name).token_loss(spec, logits_BTV, targets_BT, mask_BT, sampler_BT, adv_BT,
                                                  aux)
    if spec.kl_ref_coef:
        if aux.ref_logp_BT is None:
            raise ValueError("kl_ref.coef > 0 needs the reference model's log-probs, "
                             "and the micro-batch carries none")
        kl_BT = kl_penalty(token_logprobs(logits_BTV, targets_BT), aux.ref_logp_BT, spec.kl_ref_kind)
        loss_BT = loss_BT + spec.kl_ref_coef * kl_BT * count_BT
    return loss_BT, count_BT
