"""Alignment of per-position scores to response tokens: the one place where off-by-one errors can live."""

from __future__ import annotations


def response_slice(prompt_len: int, response_len: int) -> slice:
    """Rows of a sequence's position scores that belong to its response tokens.

    Scores are indexed so that row ``j`` scores token ``j + 1`` of the full sequence (token 0 has no prefix).
    Response token ``t`` sits at absolute position ``prompt_len + t``, hence row ``prompt_len - 1 + t``.
    """
    if prompt_len < 1:
        raise ValueError("a prompt needs at least one token to score the response against")
    return slice(prompt_len - 1, prompt_len - 1 + response_len)


def score_starts(sequences: list[list[int]], starts: list[int] | None) -> list[int]:
    """The first token to score in each sequence (``None``: every token that has a prefix, i.e. from 1),
    checked."""
    starts = [1] * len(sequences) if starts is None else list(starts)
    if len(starts) != len(sequences):
        raise ValueError(f"{len(starts)} score starts for {len(sequences)} sequences")
    for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        if not 1 <= start <= len(seq):
            raise ValueError(f"sequence {i}: score start {start} outside 1..{len(seq)}")
    return starts
