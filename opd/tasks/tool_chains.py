"""Embedded task that needs a tool: chains such as ``347*86+129=`` solved with ``calc``, one operation a call.

A ~1M-parameter character model cannot multiply three digits by two in its head; with the tool the job is
reading the operands, copying them into calls, and copying the last result out. The answer is written in
the usual order (it is copied, not computed).

    >>> row = make_row(347, 86, "+", 129)
    >>> row["prompt"], row["answer"]
    ('347*86+129=', '29971')

The teacher learns from these scripts played through the real episode runner (``opd.agents.scripted``): the
same ledger, template deltas and tool observations a live episode has, so what it is trained on is exactly
what it will see. Some scripts start with a bad call (an unknown tool, broken JSON) and recover from the
error the environment returns.
"""

from __future__ import annotations

import json
import random

from datasets import Dataset, DatasetDict

SECOND_OPS = ("+", "-")
BAD_CALLS = ("unknown_tool", "bad_json")


def make_row(a: int, b: int, op: str, c: int) -> dict:
    result = a * b + c if op == "+" else a * b - c
    return {"id": f"{a}*{b}{op}{c}", "prompt": f"{a}*{b}{op}{c}=", "answer": str(result),
            "a": a, "b": b, "op": op, "c": c}


def _number(rng: random.Random, max_digits: int) -> int:
    d = rng.randint(1, max_digits)  # the digit count first, so short operands are as common as long ones
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def build_dataset(num_train: int = 20000, num_test: int = 500, max_digits_a: int = 3, max_digits_b: int = 2,
                  seed: int = 0) -> DatasetDict:
    """Disjoint train/test splits of ``a*b+c`` / ``a*b-c`` chains (``c`` has up to three digits)."""
    rng, test, train = random.Random(seed), {}, []

    def draw() -> dict:
        return make_row(_number(rng, max_digits_a), _number(rng, max_digits_b), rng.choice(SECOND_OPS),
                        _number(rng, 3))

    while len(test) < num_test:
        row = draw()
        test.setdefault(row["id"], row)
    while len(train) < num_train:
        row = draw()
        if row["id"] not in test:
            train.append(row)
    return DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(list(test.values())))


def call(a: int | str, op: str, b: int | str, name: str = "calc") -> str:
    args = {"a": int(a), "op": op, "b": int(b)}
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args}, separators=(',', ':'))}</tool_call>"


def script(row: dict, bad: str | None = None) -> list:
    """The teacher's turns for ``row``: strings, or callables of the last observation (the tool's answer is
    read from the transcript, never computed here). ``bad``: a first call that fails (``BAD_CALLS``)."""
    first = call(row["a"], "*", row["b"])
    turns: list = []
    if bad == "unknown_tool":
        turns.append(call(row["a"], "*", row["b"], name="calculator"))
    elif bad == "bad_json":
        turns.append(first.replace("}}", "}", 1))
    elif bad is not None:
        raise ValueError(f"unknown bad call {bad!r}; valid: {BAD_CALLS}")
    return [*turns, first, lambda obs: call(obs, row["op"], row["c"]), lambda obs: obs]
