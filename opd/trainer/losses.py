"""Policy-gradient losses as pure functions over tensors (torch only).

Shapes: ``B`` sequences, ``T`` padded response length. ``mask_BT`` is 1 on real response tokens, 0 on padding.
Formulas follow ``reference/algorithms.md`` §0.2–0.3 and §1–2; every function is tested against hand-computed
values in ``tests/test_losses.py``.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum")


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str = "token-mean",
              norm_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar (§0.2). An all-masked batch gives 0 with a gradient, never NaN.

    ``seq-mean-token-sum-norm`` (Dr.GRPO) divides by a constant ``norm_len`` (defaults to T) instead of |o_i|.
    """
    m = mask_BT.to(loss_BT.dtype)
    masked = loss_BT * m
    if mode == "token-mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    if mode == "token-sum":
        return masked.sum()
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1.0)
        has_tokens = (m.sum(-1) > 0).to(loss_BT.dtype)
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
    if mode == "seq-mean-token-sum-norm":
        length = float(norm_len if norm_len is not None else loss_BT.shape[-1])
        return masked.sum() / (loss_BT.shape[0] * length) if loss_BT.shape[0] else masked.sum()
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {AGG_MODES}")


def truncated_is_weights(old_logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Detached ``min(exp(log pi_old - log q), cap)``: corrects sampler/learner mismatch (§0.3), not the PPO
    ratio."""
    return torch.exp(old_logprobs_BT.detach() - sampler_logprobs_BT).clamp(max=cap)


def prefix_is_weights(logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor,
                      cap: float) -> torch.Tensor:
    """Detached ``min(prod_{u<t} pi(y_u) / q(y_u), cap)``: the truncated ratio of the prefix that led to
    position t.

    A divergence taken over the vocabulary at position t is an expectation at the state ``y_<t``, which the
    sampler
    ``q`` chose; the token drawn at t itself is not part of it. Position 0 gets 1; masked tokens count as
    ratio 1.
    """
    log_ratio_BT = (logprobs_BT.detach() - sampler_logprobs_BT) * mask_BT
    before_BT = torch.cumsum(log_ratio_BT, dim=-1) - log_ratio_BT
    return torch.exp(before_BT).clamp(max=cap)


def clipped_pg_token_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    token_weights_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate ``-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)`` (§0.3), unreduced.

    Returns ``(loss_BT, ratio_BT, clipped_BT)``. ``old_logprobs_BT``, ``advantages_BT`` and the weights are
    constants. With a single update per batch pass ``old = logprobs.detach()``: the ratio is 1 and the
    gradient is
    ``-A * grad log pi``.
    """
    old = old_logprobs_BT.detach()
    adv = advantages_BT.detach()
    ratio = torch.exp(logprobs_BT - old)
    surr = ratio * adv
    surr_clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss_BT = -torch.minimum(surr, surr_clipped)
    if dual_clip is not None:
        loss_BT = torch.where(adv < 0, torch.minimum(loss_BT, -dual_clip * adv), loss_BT)
    if token_weights_BT is not None:
        loss_BT = loss_BT * token_weights_BT.detach()
    return loss_BT, ratio.detach(), (surr_clipped < surr).detach()


def clipped_pg_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    token_weights_BT: torch.Tensor | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``clipped_pg_token_loss`` aggregated over ``mask_BT`` (§0.2), with clip statistics.

    ``token_weights_BT`` (e.g. truncated IS weights, routing or entropy weights) multiply the per-token loss.
    """
    loss_BT, ratio, clipped = clipped_pg_token_loss(
        logprobs_BT, old_logprobs_BT, advantages_BT, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, token_weights_BT=token_weights_BT,
    )
    loss = aggregate(loss_BT, mask_BT, agg, norm_len)
    m = mask_BT.to(ratio.dtype)
    n = m.sum().clamp(min=1.0)
    stats = {"clip_frac": float((clipped.to(m.dtype) * m).sum() / n),
             "ratio_mean": float((ratio * m).sum() / n)}
    return loss, stats


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi(target_t) from logits aligned so that ``logits_BTV[:, t]`` predicts ``targets_BT[:, t]``."""
    logp = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    return logp.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits_BTV: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy ``-sum_v p log p`` of the softmax over the vocabulary, shape [B, T]."""
    logp = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    # A masked logit (-inf) has p = 0 and adds 0, not 0 * -inf = NaN; zeroed before the product for the
    # gradient too.
    return -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)
