"""TIP token selection for on-policy distillation (torch only): which response tokens get the distillation
loss.

Shapes: ``B`` sequences, ``T`` padded response length, ``V`` vocabulary. ``mask_BT`` is 1 on valid response
tokens. Two per-token signals, both computed without gradient: student entropy ĥ and teacher–student
divergence d̂ (``reference/algorithms.md`` §6). Selection never changes the loss maths, only the mask it is
averaged over. Tested in ``tests/test_objectives.py``.
"""

from __future__ import annotations

import math

import torch

from opd.trainer.divergences import generalized_jsd

SELECT_MODES = ("entropy", "divergence", "soft_or", "overconfident", "entropy_sample")


def normalized_entropy(entropy_BT: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``ĥ = H / ln V`` ∈ [0, 1] (§6.1), shape [B, T], detached; clamped against rounding past the bounds."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    return (entropy_BT.detach().float() / math.log(vocab_size)).clamp(0.0, 1.0)


def normalized_jsd(student_logp_BTV: torch.Tensor, teacher_logp_BTV: torch.Tensor) -> torch.Tensor:
    """``d̂ = JSD(S, T) / ln 2`` ∈ [0, 1] with equal weights ``M = (S+T)/2`` over the last dim (§6.1), shape
    [B, T].

    Pass full-vocabulary log-probs, or both sides' top-k log-probs renormalised (OPSD-TIP ``jsd_topk``).
    Detached.
    """
    with torch.no_grad():
        jsd = generalized_jsd(student_logp_BTV.float(), teacher_logp_BTV.float(), 0.5)
    return (jsd / math.log(2.0)).clamp(0.0, 1.0)


def _minmax(x_N: torch.Tensor) -> torch.Tensor:
    # Per-batch min-max (TIP's documented limitation); a constant signal maps to 0 rather than 0/0.
    span = x_N.max() - x_N.min()
    return (x_N - x_N.min()) / span if span > 0 else torch.zeros_like(x_N)


def _top(score_N: torch.Tensor, n: int) -> torch.Tensor:
    return score_N.topk(min(n, score_N.numel())).indices


def select_tokens(
    student_entropy_BT: torch.Tensor,
    divergence_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    keep_ratio: float,
    mode: str,
    generator: torch.Generator | None = None,
    *,
    alpha: float = 1.0,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Pick the tokens that keep the distillation loss (§6.3); returns ``keep_mask_BT`` in ``mask_BT``'s
    dtype.

    ``n_keep = max(1, ⌊keep_ratio·N_valid⌋)`` over the valid tokens of the whole batch (0 if none is valid);
    masked tokens are never selected. Modes, all invariant to the scale of the inputs (pass ĥ and d̂ from
    ``normalized_entropy`` / ``normalized_jsd``, or raw values):

    * ``entropy``: top ``n_keep`` by student entropy.
    * ``divergence``: top ``n_keep`` by divergence.
    * ``soft_or``: min-max normalise both over valid tokens, ``s = ĥ' + d̂' − ĥ'·d̂'`` (a soft OR: high when
    either
      is high), keep the top ``n_keep`` [inferred, §6.3].
    * ``overconfident``: the Q3 quadrant, low entropy ``H ≤ median`` AND high divergence ``D ≥ median``
    (medians
      over valid tokens, inclusive so a constant signal does not empty the quadrant), then up to ``n_keep`` of
      those ranked by divergence. If Q3 is empty the single highest-divergence valid token is kept.
    * ``entropy_sample``: ``n_keep`` draws by multinomial sampling without replacement with weights
      ``ĥ^alpha · d̂^gamma`` (each factor clamped at 1e-8, as OPSD-TIP ``entropy_weighted_sample``).
    """
    if mode not in SELECT_MODES:
        raise ValueError(f"unknown token selection mode {mode!r}; valid: {SELECT_MODES}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    valid_flat = mask_BT.reshape(-1) > 0
    rows_N = valid_flat.nonzero().squeeze(-1)
    keep_flat = torch.zeros_like(valid_flat)
    n_valid = rows_N.numel()
    if n_valid == 0:
        return keep_flat.view(mask_BT.shape).to(mask_BT.dtype)
    # The epsilon absorbs float error such as 0.29 * 100 = 28.999999999999996.
    n_keep = max(1, math.floor(keep_ratio * n_valid + 1e-9))
    h_N = student_entropy_BT.detach().reshape(-1)[rows_N].float()
    d_N = divergence_BT.detach().reshape(-1)[rows_N].float()

    if mode == "entropy":
        chosen = _top(h_N, n_keep)
    elif mode == "divergence":
        chosen = _top(d_N, n_keep)
    elif mode == "soft_or":
        h, d = _minmax(h_N), _minmax(d_N)
        chosen = _top(h + d - h * d, n_keep)
    elif mode == "overconfident":
        q3 = (h_N <= h_N.quantile(0.5)) & (d_N >= d_N.quantile(0.5))
        # Rank Q3 tokens by divergence; tokens outside Q3 are pushed below every Q3 token by the -inf score.
        score = torch.where(q3, d_N, torch.full_like(d_N, -math.inf))
        chosen = _top(score, min(n_keep, max(1, int(q3.sum()))))
        if not q3.any():
            chosen = _top(d_N, 1)
    else:
        weights = h_N.clamp(min=1e-8).pow(alpha) * d_N.clamp(min=1e-8).pow(gamma)
        chosen = torch.multinomial(weights, n_keep, replacement=False, generator=generator)
    keep_flat[rows_N[chosen]] = True
    return keep_flat.view(mask_BT.shape).to(mask_BT.dtype)
