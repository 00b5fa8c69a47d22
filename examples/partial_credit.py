"""A custom verifier: partial credit for each correct answer digit, on top of the exact-match check.

A verifier is a TRL-style reward function: ``fn(prompts, completions, **columns) -> list[float]``, one score
per row; dataset columns (here ``answer``) arrive as keyword lists. Name it in a config as
``examples/partial_credit.py:digit_credit`` (or ``package.module:function`` once installed).
"""

from __future__ import annotations


def digit_credit(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """Share of answer digits in the right place; 0.0 for an empty or over-long completion."""
    scores = []
    for completion, truth in zip(completions, answer, strict=True):
        got = completion.strip()
        if not got or len(got) > len(truth) + 1:
            scores.append(0.0)
            continue
        scores.append(sum(a == b for a, b in zip(got, truth, strict=False)) / len(truth))
    return scores
