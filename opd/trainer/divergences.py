"""Divergences between student and teacher distributions, as pure functions over tensors (torch only).

Shapes: ``B`` sequences, ``T`` padded response length, ``V`` vocabulary, ``K`` top-k size; ``..`` is any
leading shape. Distribution arguments are log-probabilities over the last dim (``s_logp`` student, ``t_logp``
teacher). The teacher is always a constant: every function detaches it, so gradients flow through the student
only. Maths: ``reference/algorithms.md`` §0.4 (KL-to-reference estimators) and §0.5 (distillation
divergences). Tested against hand-computed values in ``tests/test_divergences.py``.
"""

from __future__ import annotations

import math

import torch

KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
FULL_VOCAB_KINDS = ("reverse", "forward", "jsd")


def kl_penalty(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL-to-reference estimate on sampled tokens (§0.4), ``Δ = logp - ref_logp``, shape [B, T].

    ``k1 = Δ``, ``k2 = Δ²/2``, ``k3``/``low_var_kl`` ``= exp(-Δ) + Δ - 1`` (≥ 0). As in verl, k3 clamps ``-Δ``
    to [-20, 20] and the result to [-10, 10] so one wild token cannot blow up the loss. Differentiable in
    ``logp`` (meant as a loss term); the reference is a constant.
    """
    delta = logp_BT - ref_logp_BT.detach()
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * delta.square()
    if kind in ("k3", "low_var_kl"):
        neg = (-delta).clamp(-20.0, 20.0)
        return (neg.exp() - neg - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown kl kind {kind!r}; valid: {KL_KINDS}")


def _expect(logp: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``Σ_v p(v)·value(v)`` over the last dim, where ``p = exp(logp)``.

    A category with ``logp = -inf`` (a masked vocabulary entry) adds 0, as ``0·x = 0`` in the maths, rather
    than
    ``0·(-inf) = NaN``: the value is zeroed there before the product, so the gradient stays finite as well (a
    ``torch.where`` after the product would still send the NaN into the backward).
    """
    return (logp.exp() * value.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)


def reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Mode-seeking ``KL(S‖T) = Σ_v S(v)(log S(v) - log T(v))`` over the last dim (§0.5); shape ``..``.

    Written out rather than via ``F.kl_div``, whose ``(input, target)`` order computes ``KL(target‖input)``.
    """
    return _expect(s_logp, s_logp - t_logp.detach())


def forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Mode-covering ``KL(T‖S) = Σ_v T(v)(log T(v) - log S(v))`` over the last dim (§0.5); shape ``..``."""
    t = t_logp.detach()
    return _expect(t, t - s_logp)


def generalized_jsd(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD with teacher weight ``beta`` (§0.5, GKD Eq. 1): ``β·KL(T‖M) + (1-β)·KL(S‖M)``, shape
    ``..``.

    ``M = β·T + (1-β)·S``. The endpoints are special-cased because the interior formula tends to 0 there:
    ``beta=0`` is forward ``KL(T‖S)``, ``beta=1`` is reverse ``KL(S‖T)`` (TRL ``beta`` = SDPO ``alpha``).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta (teacher weight) must be in [0, 1], got {beta}")
    t = t_logp.detach()
    if beta == 0.0:
        return forward_kl(s_logp, t)
    if beta == 1.0:
        return reverse_kl(s_logp, t)
    # log M by logsumexp: mixing in prob space would underflow for the tiny tail probabilities. Where both
    # sides are
    # -inf, M is 0 and both terms vanish; a logsumexp over two -inf would still put NaN into the gradient.
    both = torch.isneginf(t) & torch.isneginf(s_logp)
    log_m = torch.logsumexp(
        torch.stack([t.masked_fill(both, 0.0) + math.log(beta),
                     s_logp.masked_fill(both, 0.0) + math.log(1.0 - beta)]), dim=0
    )
    return beta * _expect(t, t - log_m) + (1.0 - beta) * _expect(s_logp, s_logp - log_m)


def with_tail(topk_logp: torch.Tensor) -> torch.Tensor:
    """Append the tail bucket ``log(1 - Σ_k p_k)`` to top-k log-probs: ``[.., K] -> [.., K+1]`` (§0.5, SDPO).

    For a side known only by its top-k (a teacher server's). Computed as ``log(-expm1(logsumexp))`` for
    precision when the top-k mass is close to 1; the logsumexp is clamped at -1e-7 so a top-k holding all the
    mass gives a tiny finite tail instead of ``log 0``. Below that the tail is wrong and has no gradient: a
    side whose full log-probs are at hand takes ``at_with_rest`` instead.
    """
    log_mass = torch.logsumexp(topk_logp, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([topk_logp, torch.log(-torch.expm1(log_mass))], dim=-1)


def at_with_rest(logp_BTV: torch.Tensor, idx_BTK: torch.Tensor) -> torch.Tensor:
    """Full log-probs -> the K at ``idx_BTK`` and, last, the log of the mass at every other index: ``[..,
    K+1]``.

    The rest is a logsumexp over the other entries, exact however little mass they hold (4e-8, 2e-12, ...),
    and its gradient is the one that moves mass back there; ``log(1 - Σ_k p_k)`` loses both once ``Σ_k p_k``
    rounds to 1.
    ``idx_BTK`` must leave at least one index out.
    """
    rest = logp_BTV.scatter(-1, idx_BTK, -math.inf)
    # Where every other entry is -inf (logits masked outside the top-k), the rest is -inf with no gradient; a
    # logsumexp over -inf alone would still be -inf but send NaN (exp(-inf - -inf)) into the backward.
    empty = torch.isneginf(rest).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(rest.masked_fill(empty, 0.0), dim=-1, keepdim=True).masked_fill(empty, -math.inf)
    return torch.cat([logp_BTV.gather(-1, idx_BTK), lse], dim=-1)


def _renormalize(logp: torch.Tensor) -> torch.Tensor:
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -_expect(logp, logp)


def student_topk_divergence(
    student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, k: int, beta: float, tail: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPO's divergence over the student's top-k support (§0.5 variant 1, §3.2): returns ``(div_BT,
    t_ent_BT)``.

    Indices of the student's top-``k`` logits pick K categories; the teacher's log-probs are gathered at the
    same indices. With ``tail`` a (K+1)-th bucket holds each side's remaining mass (``at_with_rest``: both
    sides' full log-probs are here); without it both are renormalised over the K entries. A top-k covering the
    whole vocabulary needs no tail. ``div_BT`` is the generalised JSD with teacher weight ``beta``;
    ``t_ent_BT`` is the teacher's entropy over that same support (SRPO's entropy weights, §5.2), detached.
    Logits should already be divided by the rollout temperature.
    """
    s_logp_BTV = torch.log_softmax(student_logits_BTV.float(), dim=-1)
    t_logp_BTV = torch.log_softmax(teacher_logits_BTV.detach().float(), dim=-1)
    k = min(k, s_logp_BTV.shape[-1])
    idx_BTK = s_logp_BTV.detach().topk(k, dim=-1).indices
    if tail and k < s_logp_BTV.shape[-1]:
        s_sup, t_sup = at_with_rest(s_logp_BTV, idx_BTK), at_with_rest(t_logp_BTV, idx_BTK)
    else:
        s_sup, t_sup = (_renormalize(s_logp_BTV.gather(-1, idx_BTK)),
                        _renormalize(t_logp_BTV.gather(-1, idx_BTK)))
    return generalized_jsd(s_sup, t_sup, beta), _entropy(t_sup)


def teacher_topk_forward_kl(
    student_logp_BTV: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor,
    teacher_topk_logp_BTK: torch.Tensor,
    tail: bool = True,
) -> torch.Tensor:
    """Forward ``KL(T‖S)`` over the teacher's top-k ids (§0.5 variant 2), shape [B, T].

    What a teacher server can feed: it returns only its top-k ids and (full-vocabulary) log-probs. With
    ``tail``
    the extra bucket is the student's mass outside those ids on the student side (exact, from its full
    log-probs:
    ``at_with_rest``) and the teacher's leftover mass ``1 - Σ_k`` on the teacher side (``with_tail``); without
    it both are renormalised over the K ids (SD-Zero / TRL server mode).
    """
    ids_BTK = teacher_topk_ids_BTK.long()
    t_BTK = teacher_topk_logp_BTK.detach().float()
    if tail:
        return forward_kl(at_with_rest(student_logp_BTV.float(), ids_BTK), with_tail(t_BTK))
    return forward_kl(_renormalize(student_logp_BTV.float().gather(-1, ids_BTK)), _renormalize(t_BTK))


def sorted_topk_l1(student_logp_BTV: torch.Tensor, teacher_topk_logp_BTK: torch.Tensor) -> torch.Tensor:
    """ULD (Boizard et al. 2024, Universal Logit Distillation): ``Σ_k |p_S,(k) - p_T,(k)|`` over the K largest
    probabilities of each side, each sorted in decreasing order, shape [B, T] (the reference sorts whole
    vocabularies, zero-padded; a teacher gives its top-k here). It compares the shapes of the two
    distributions, never which token is which, so it needs no shared vocabulary; the gradient reaches the
    student's K most likely tokens. A padded teacher entry (log-prob -1e4) counts as probability 0."""
    t_BTK = teacher_topk_logp_BTK.detach().float().exp().sort(dim=-1, descending=True).values
    s_BTK = student_logp_BTV.float().topk(t_BTK.shape[-1], dim=-1).values.exp()
    return (s_BTK - t_BTK).abs().sum(-1)


def full_vocab_divergence(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    kind: str = "reverse",
    beta: float = 0.5,
    chunk_tokens: int = 512,
) -> torch.Tensor:
    """Exact per-token divergence over the whole vocabulary (§0.5, OPSD-TIP §1.4), shape [B, T], 0 where
    masked.

    ``kind``: ``reverse`` = ``KL(S‖T)``, ``forward`` = ``KL(T‖S)``, ``jsd`` = generalised JSD with teacher
    weight
    ``beta``. Only unmasked tokens are computed, ``chunk_tokens`` rows at a time with an fp32 log-softmax, so
    the fp32 ``[N, V]`` temporaries of a forward without grad stay bounded; with grad, autograd still keeps
    each chunk's log-softmax for the backward, so bound memory by the micro-batch size there.
    """
    if kind not in FULL_VOCAB_KINDS:
        raise ValueError(f"unknown full-vocab divergence {kind!r}; valid: {FULL_VOCAB_KINDS}")
    B, T, V = student_logits_BTV.shape
    rows_N = (mask_BT.reshape(-1) > 0).nonzero().squeeze(-1)
    s_flat_NV = student_logits_BTV.reshape(B * T, V)
    t_flat_NV = teacher_logits_BTV.detach().reshape(B * T, V)
    pieces = []
    for start in range(0, rows_N.numel(), chunk_tokens):
        rows = rows_N[start : start + chunk_tokens]
        s_logp = torch.log_softmax(s_flat_NV[rows].float(), dim=-1)
        t_logp = torch.log_softmax(t_flat_NV[rows].float(), dim=-1)
        if kind == "reverse":
            pieces.append(reverse_kl(s_logp, t_logp))
        elif kind == "forward":
            pieces.append(forward_kl(s_logp, t_logp))
        else:
            pieces.append(generalized_jsd(s_logp, t_logp, beta))
    if not pieces:
        # All masked: zeros that stay on the graph, so a caller's backward() still runs (and gives zero
        # grads).
        return student_logits_BTV.float().sum(-1) * 0.0
    out = torch.zeros(B * T, dtype=torch.float32, device=student_logits_BTV.device)
    # index_copy keeps the graph: gradients reach the student logits of the kept rows only.
    return out.index_copy(0, rows_N, torch.cat(pieces)).view(B, T)
