"""Pieces of a micro-batch for the LM head and the loss, so ``[tokens, vocab]`` logits never exist for all of
it.

The learner runs the student's trunk once per micro-batch, then the LM head and the loss piece by piece: a
piece's logits (the student's, with grad, and the teacher's, without) live only while its loss and its
backward run. The gradient with respect to the trunk's output collects in one leaf tensor and then flows back
through the trunk in a single backward pass, so the update is the one an unchunked step makes (tested to
1e-5).

Pieces are whole sequences: the prefix importance weight and the sequence-level GRPO aggregations read a
sequence at once. Token selection's flattened ``[1, N]`` batch (kept tokens of many sequences, a per-token
objective only) is cut into spans of tokens instead. ``chunk_tokens <= 0`` makes the whole micro-batch one
piece.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Piece = tuple  # an index into [B, T, ...] tensors: (rows,) or (slice(None), tokens)


def pieces(batch: int, length: int, chunk_tokens: int, by_token: bool = False) -> list[Piece]:
    """Indices that cut a ``[batch, length]`` micro-batch into pieces of at most ``chunk_tokens`` positions (a
    whole sequence being the smallest piece unless ``by_token``)."""
    if chunk_tokens <= 0:
        return [(slice(None),)]
    if by_token:
        return [(slice(None), slice(a, a + chunk_tokens)) for a in range(0, max(length, 1), chunk_tokens)]
    rows = max(1, chunk_tokens // max(length, 1))
    return [(slice(a, a + rows),) for a in range(0, max(batch, 1), rows)]


@torch.no_grad()
def per_piece(fn: Callable[[Piece], torch.Tensor], parts: list[Piece]) -> torch.Tensor:
    """``fn`` of every piece, put back together as one ``[B, T]`` tensor (statistics computed without
    grad)."""
    outs = [fn(p) for p in parts]
    dim = 1 if len(parts[0]) == 2 else 0
    return torch.cat(outs, dim=dim)
