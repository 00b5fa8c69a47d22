"""How a learner step splits its sequences into micro-batches, and what the split costs in padding.

A micro-batch is right-padded to its longest row, so a fixed count of mixed-length sequences pays for
``rows x longest`` positions. With a token budget the sequences are sorted by length and grouped greedily
while
``rows x longest`` stays within the budget: rows of similar length share a micro-batch, most padding
disappears and the forward's size is bounded in tokens rather than in sequences. The step's result does not
depend on the split (losses are normalised over the whole step), only the float rounding of the gradient sum
does.
"""

from __future__ import annotations


def by_count(n: int, size: int) -> list[list[int]]:
    """Consecutive groups of ``size`` sequences (``trainer.micro_batch_size``)."""
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def by_token_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Groups whose padded size (rows x longest row) is at most ``budget`` (``trainer.micro_batch_tokens``).

    Longest first, so each group's first row fixes its width and the rows after it only fill the remaining
    room. A sequence longer than the budget gets a micro-batch of its own: a row cannot be split without
    varlen attention.
    """
    if budget < 1:
        raise ValueError(f"trainer.micro_batch_tokens must be >= 1 for a token budget, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    width = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * width <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
            width = lengths[i]
    return groups


def plan(lengths: list[int], micro_batch_size: int, micro_batch_tokens: int = 0) -> list[list[int]]:
    """The step's micro-batches as lists of sequence indices: by token budget when one is set, else by
    count."""
    if micro_batch_tokens > 0:
        return by_token_budget(lengths, micro_batch_tokens)
    return by_count(len(lengths), micro_batch_size)


def padded_tokens(lengths: list[int], groups: list[list[int]]) -> int:
    """Positions the forward passes pay for: each group is as wide as its longest row."""
    return sum(len(g) * max(lengths[i] for i in g) for g in groups if g)
