"""Token-balanced shards of a train batch, one per learner rank (pure Python, no torch).

A rank's step time grows with the tokens it runs through the model, not with its number of sequences, and
every rank waits for the slowest one at the gradient all-reduce. So the batch is split by token count: greedy
longest-first onto the least-loaded shard (LPT scheduling, at most 4/3 of the optimum in the worst case and
within a token or two of even on batches of many short sequences). Tested in ``tests/test_learner_ranks.py``.

    shards = balance_shards([len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)],
    num_ranks)
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

from opd.types import TrainBatch


def balance_shards(lengths: Sequence[int], num_shards: int) -> list[list[int]]:
    """Split sample indices into ``num_shards`` lists of near-equal total length; each list ascending.

    Deterministic: longer samples first (ties: lower index first), each onto the shard with the fewest tokens
    so far (ties: lower shard). Every rank must agree on the split, and reruns must reproduce it. With more
    shards than samples the last shards stay empty.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    # (tokens so far, shard index): the least-loaded shard pops first
    heap = [(0, s) for s in range(num_shards)]
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, s = heapq.heappop(heap)
        shards[s].append(i)
        heapq.heappush(heap, (load + lengths[i], s))
    return [sorted(idx) for idx in shards]


def shard_imbalance(lengths: Sequence[int], shards: list[list[int]]) -> float:
    """max / mean of the shards' token counts: 1.0 is perfectly even; the step runs at the pace of the max."""
    loads = [sum(lengths[i] for i in idx) for idx in shards]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def take(batch: TrainBatch, idx: list[int]) -> TrainBatch:
    """The samples ``idx`` of ``batch``, in that order: every per-sample field is cut the same way."""
    cut = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        cut[f.name] = [value[i] for i in idx] if isinstance(value, list) else value
    return TrainBatch(**cut)
