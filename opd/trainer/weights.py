"""Sample and token weights for SRPO, PACED, KEPO and the quality gate, as pure functions over tensors (torch
only).

Shapes: ``B`` sequences, ``T`` padded response length, ``P`` problems (prompts). ``mask_BT`` is 1 on real
response tokens. Advantages and weights are constants for the loss: every such output is detached. Maths:
``reference/algorithms.md`` §5 (SRPO), §7 (PACED), §8.1 (KEPO). Tested in ``tests/test_objectives.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def entropy_weights(
    teacher_entropy_BT: torch.Tensor,
    sdpo_token_mask_BT: torch.Tensor,
    beta: float = 1.0,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """DW-SDPO token weights (§5.2), shape [B, T], detached: ``w̃ = exp(−β·H)``, normalised to mean 1.

    ``sdpo_token_mask_BT`` = response mask × ``z_sdpo`` (the SDPO-routed valid tokens, Ω_sdpo). The mean is
    taken over all of Ω_sdpo in the tensor given (global over the batch, as the paper words it). Low teacher
    entropy (a confident teacher) gets more weight. Tokens outside the mask get 0; an empty mask gives all
    zeros. When the batch is sharded over learner ranks, ``sum_over_ranks`` and ``max_over_ranks`` (all-reduce
    SUM and MAX) turn the shard's token count, weight sum and largest ``-β·H`` into the batch's, so every rank
    normalises by the same global mean.
    """
    m = sdpo_token_mask_BT.detach().float()
    neg_bh = torch.where(m > 0, -beta * teacher_entropy_BT.detach().float(), -torch.inf)
    # exp(-β·H) underflows to 0 everywhere once β·H passes ~100; the normalisation cancels any common factor,
    # so shift by the batch's largest -β·H first (its token gets exp(0) = 1). Masked tokens are -inf: exp
    # gives 0.
    local_max = (neg_bh.max().reshape(1) if neg_bh.numel()
                 else torch.full((1,), -torch.inf, device=neg_bh.device))
    shift = max_over_ranks(local_max) if max_over_ranks is not None else local_max
    shift = shift if torch.isfinite(shift).all() else torch.zeros_like(shift)  # empty Ω_sdpo on every rank
    w_raw = torch.exp(neg_bh - shift)
    sums = torch.stack([m.sum(), w_raw.sum()])
    count, total = sum_over_ranks(sums) if sum_over_ranks is not None else sums
    # Empty Ω_sdpo: numerator is all zeros, so clamping the denominator yields zeros instead of 0/0.
    return w_raw * count / total.clamp(min=torch.finfo(w_raw.dtype).tiny)


def paced_weights(
    pass_rate_P: torch.Tensor, a: float = 1.0, b: float = 1.0, normalize: bool = True
) -> torch.Tensor:
    """PACED per-problem weights ``p^a·(1−p)^b`` (§7, Beta kernel; default ``p(1−p)``), shape [P], detached.

    Problems with ``p ∈ {0, 1}`` always get 0, also when ``a`` or ``b`` is 0 (where ``0^0`` would give 1): an
    all-right or all-wrong group carries no distillation signal worth its gradient noise. ``normalize`` (§7
    marks it [inferred]) rescales so the mean over problems with non-zero weight is 1: zero-weight problems
    then act as if filtered out, and the loss scale (hence the learning rate) stays comparable to unweighted
    training on the informative problems. All-zero weights stay zero.
    """
    p = pass_rate_P.detach().float()
    informative = (p > 0.0) & (p < 1.0)
    w_P = torch.where(
        informative, p.clamp(0.0, 1.0).pow(a) * (1.0 - p).clamp(0.0, 1.0).pow(b), torch.zeros_like(p)
    )
    if not normalize:
        return w_P
    nonzero = (w_P > 0).float()
    return w_P * nonzero.sum() / w_P.sum().clamp(min=torch.finfo(w_P.dtype).tiny)


def quality_gate(rewards_B: torch.Tensor, threshold: float) -> torch.Tensor:
    """KEPO-style gate (§8.1), shape [B]: 1.0 where ``reward ≥ threshold`` (distil only good rollouts), else
    0.0."""
    return (rewards_B.detach() >= threshold).float()
