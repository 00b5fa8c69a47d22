"""The word-problem task for real instruct models: correct answers, disjoint splits, deterministic rows."""

from __future__ import annotations

import pytest

from opd.tasks.word_problems import INSTRUCTION, TEMPLATES, build_dataset, make_row


def test_rows_hold_the_right_answer_and_the_instruction():
    assert make_row("more", 7, 5, "Tom", "apples")["answer"] == "12"
    assert make_row("take", 17, 14, "Ben", "shells")["answer"] == "3"
    row = make_row("sum", 8, 18, "Zoe", "cards")
    assert (row["prompt"] == f"What is 8 + 18? {INSTRUCTION}" and row["answer"] == "26"
            and row["id"] == "sum/8/18")


def test_splits_are_disjoint_deterministic_and_never_negative():
    a, b = build_dataset(400, 100, 20, seed=3), build_dataset(400, 100, 20, seed=3)
    assert list(a["train"]) == list(b["train"]) and list(a["test"]) == list(b["test"])
    assert not {r["id"] for r in a["test"]} & {r["id"] for r in a["train"]}
    assert len({r["id"] for r in a["test"]}) == 100
    for r in list(a["train"]) + list(a["test"]):
        kind, x, y = r["id"].split("/")[:3]
        assert int(r["answer"]) == TEMPLATES[kind][1](int(x), int(y)) > 0
    assert {r["kind"] for r in a["train"]} == set(TEMPLATES)


def test_too_few_distinct_problems_is_refused():
    with pytest.raises(ValueError, match="task.max_operand"):
        build_dataset(10, 500, max_operand=2)
