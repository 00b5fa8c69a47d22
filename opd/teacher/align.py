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


def align_response(rows: list, prompt_len: int, response_len: int) -> list:
    """Pick the response tokens' rows out of full-sequence rows; fails loudly when the lengths disagree."""
    s = response_slice(prompt_len, response_len)
    picked = rows[s]
    if len(picked) != response_len:
        raise ValueError(f"scores cover {len(rows)} positions; response needs rows {s.start}..{s.stop - 1}")
    return picked
