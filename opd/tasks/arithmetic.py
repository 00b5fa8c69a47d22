"""Embedded verifiable task: multi-digit addition with the answer written least-significant digit first.

Writing the sum reversed lets a tiny causal model produce each digit from the two operand digits and the carry
it has just written, which is what makes a ~1M-parameter teacher reach high accuracy in minutes on a CPU.

    >>> row = make_row(123, 45, "+")
    >>> row["prompt"], row["answer"]
    ('123+45=', '861')
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

OPS = ("+", "-")


def solve(a: int, b: int, op: str) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    raise ValueError(f"unknown operator {op!r}; valid: {OPS}")


def make_row(a: int, b: int, op: str) -> dict:
    result = solve(a, b, op)
    answer = str(abs(result))[::-1] + ("-" if result < 0 else "")
    return {"id": f"{a}{op}{b}", "prompt": f"{a}{op}{b}=", "answer": answer, "a": a, "b": b, "op": op}


def _draw(rng: random.Random, max_digits_a: int, max_digits_b: int,
          ops: tuple[str, ...]) -> tuple[int, int, str]:
    # Draw the digit count first so short operands are as common as long ones.
    da = rng.randint(1, max_digits_a)
    db = rng.randint(1, max_digits_b)
    a = rng.randint(0 if da == 1 else 10 ** (da - 1), 10**da - 1)
    b = rng.randint(0 if db == 1 else 10 ** (db - 1), 10**db - 1)
    op = rng.choice(ops)
    if op == "-" and b > a:
        a, b = b, a  # keep results non-negative
    return a, b, op


def build_dataset(
    num_train: int = 20000,
    num_test: int = 500,
    max_digits_a: int = 3,
    max_digits_b: int = 3,
    ops: tuple[str, ...] = ("+",),
    seed: int = 0,
) -> DatasetDict:
    """Disjoint train/test splits: no (a, op, b) problem of the test split appears in train."""
    for op in ops:
        if op not in OPS:
            raise ValueError(f"task.ops: unknown operator {op!r}; valid: {list(OPS)}")
    space = sum(10**max_digits_a * 10**max_digits_b for _ in ops)
    if num_test + num_train > space // 2:
        raise ValueError(
            f"task: {num_train} train + {num_test} test problems do not fit in {space} distinct problems; "
            "lower task.num_train or raise the digit counts"
        )
    rng = random.Random(seed)
    test: dict[str, dict] = {}
    while len(test) < num_test:
        row = make_row(*_draw(rng, max_digits_a, max_digits_b, ops))
        test.setdefault(row["id"], row)
    train: list[dict] = []
    while len(train) < num_train:
        row = make_row(*_draw(rng, max_digits_a, max_digits_b, ops))
        if row["id"] not in test:
            train.append(row)  # repeats inside train are fine: small digit counts have few problems
    return DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(list(test.values())))


def parse_completion(completion: str) -> str:
    """The answer as written: everything up to the first whitespace, stripped."""
    return completion.strip().split()[0] if completion.strip() else ""


def exact_answer(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """TRL-style reward: 1.0 when the completion's answer equals the ground truth, else 0.0."""
    return [1.0 if parse_completion(c) == a else 0.0 for c, a in zip(completions, answer, strict=True)]
