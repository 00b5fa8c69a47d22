"""Embedded task for real instruct models: short word problems with a numeric answer, scored by
``math_answer``.

    >>> row = make_row("take", 17, 14, "Ben", "shells")
    >>> row["prompt"], row["answer"]
    ('Ben has 17 shells and gives away 14. How many shells are left? Reply with only the final number.', '3')

Sums and differences of two numbers up to ``task.max_operand``, in a few phrasings. SmolLM2-135M-Instruct gets
about 45 % of them (it often slips on the arithmetic itself); a depth-pruned copy of it starts near zero,
which is the gap on-policy distillation closes. The answer is the number; ``math_answer`` finds it in a
free-text reply.
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Maya", "Leo", "Nora", "Omar", "Zoe")
OBJECTS = ("apples", "marbles", "books", "stickers", "pencils", "cookies", "coins", "shells", "cards",
           "stamps")
INSTRUCTION = "Reply with only the final number."
TEMPLATES = {
    "more": ("{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?",
             lambda a, b: a + b),
    "buy": ("{name} had {a} {obj} and bought {b} more. How many {obj} does {name} have?", lambda a, b: a + b),
    "take": ("{name} has {a} {obj} and gives away {b}. How many {obj} are left?", lambda a, b: a - b),
    "lose": ("{name} had {a} {obj} and lost {b} of them. How many {obj} does {name} have left?",
             lambda a, b: a - b),
    "sum": ("What is {a} + {b}?", lambda a, b: a + b),
}


def make_row(kind: str, a: int, b: int, name: str, obj: str) -> dict:
    text, solve = TEMPLATES[kind]
    question = text.format(name=name, obj=obj, a=a, b=b)
    return {"id": f"{kind}/{a}/{b}/{name}/{obj}" if "{name}" in text else f"{kind}/{a}/{b}",
            "prompt": f"{question} {INSTRUCTION}", "answer": str(solve(a, b)), "kind": kind}


def _draw(rng: random.Random, max_operand: int, kinds: tuple[str, ...]) -> dict:
    kind = rng.choice(kinds)
    a, b = rng.randint(2, max_operand), rng.randint(2, max_operand)
    if TEMPLATES[kind][1](a, b) < 0 or a == b and kind in ("take", "lose"):
        a, b = max(a, b) + (a == b), min(a, b)  # a positive difference: nothing given away that was not there
    return make_row(kind, a, b, rng.choice(NAMES), rng.choice(OBJECTS))


def build_dataset(num_train: int, num_test: int, max_operand: int = 20, seed: int = 0,
                  kinds: tuple[str, ...] = tuple(TEMPLATES)) -> DatasetDict:
    """Disjoint train/test splits of the phrasings ``kinds``: no test problem (phrasing, numbers, name,
    object) appears in train."""
    if max_operand < 2:
        raise ValueError(f"task.max_operand must be at least 2, got {max_operand}")
    unknown = [k for k in kinds if k not in TEMPLATES]
    if unknown or not kinds:
        raise ValueError(f"task.kinds: {unknown or 'empty'}; valid: {list(TEMPLATES)}")
    rng = random.Random(seed)
    test: dict[str, dict] = {}
    for _ in range(50 * num_test):
        if len(test) >= num_test:
            break
        row = _draw(rng, max_operand, tuple(kinds))
        test.setdefault(row["id"], row)
    if len(test) < num_test:
        raise ValueError(f"task: only {len(test)} distinct problems up to task.max_operand={max_operand}; "
                         f"lower task.num_test ({num_test}) or raise task.max_operand")
    train: list[dict] = []
    while len(train) < num_train:
        row = _draw(rng, max_operand, tuple(kinds))
        if row["id"] not in test:
            train.append(row)  # repeats inside train are fine
    return DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(list(test.values())))
