"""Embedded verifiable tasks that generate `datasets.Dataset` splits, and the user's own rows
(``task.name=files`` from files, ``task.name=hub`` from a `datasets` dataset)."""

from __future__ import annotations


def task_rows(t) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) of the task a ``TaskConfig`` names; a data problem raises ``ValueError``."""
    cols = {"prompt_column": t.prompt_column, "answer_column": t.answer_column,
            "answer_pattern": t.answer_pattern}
    if t.name == "files":
        from opd.tasks.files import load_rows

        return (load_rows(t.train_path, key="task.train_path", **cols),
                load_rows(t.test_path, key="task.test_path", **cols))
    if t.name == "hub":
        from opd.tasks.files import check_rows
        from opd.tasks.hub import load_split

        splits = [(t.train_split, "task.train_split"), (t.test_split, "task.test_split")]
        train, test = (check_rows(load_split(t.dataset, t.dataset_config, split, key),
                                  f"task.dataset: {t.dataset!r} split {split!r}", **cols)
                       for split, key in splits)
        return train, test
    if t.name == "tool_chains":
        from opd.tasks.tool_chains import build_dataset

        data = build_dataset(t.num_train, t.num_test, t.max_digits_a, t.max_digits_b, t.seed)
    elif t.name == "word_problems":
        from opd.tasks.word_problems import build_dataset

        data = build_dataset(t.num_train, t.num_test, t.max_operand, t.seed, tuple(t.kinds))
    else:
        from opd.tasks.arithmetic import build_dataset

        data = build_dataset(t.num_train, t.num_test, t.max_digits_a, t.max_digits_b, tuple(t.ops), t.seed)
    return list(data["train"]), list(data["test"])
