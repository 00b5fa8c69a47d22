"""A user's own prompts: rows from JSON Lines, JSON, Parquet or CSV files, or a `datasets` ``save_to_disk``
directory.

Each row needs a prompt and a ground-truth answer (column names configurable); every other column is handed to
the verifiers as a keyword argument, TRL style. A bad row is refused with its file and row number, before
anything runs.

    task:
      name: files
      train_path: data/train.jsonl     # {"prompt": "...", "answer": "...", ...} per line
      test_path: data/test.jsonl
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """A dataset file that cannot be used; the message names the config key and, for a bad row, the row."""


def load_rows(path: str, *, key: str, prompt_column: str = "prompt", answer_column: str = "answer",
              answer_pattern: str | None = None) -> list[dict]:
    """Rows of one split with ``prompt`` and ``answer`` as strings (renamed from the configured columns)."""
    rows = _read(Path(path), key)
    return check_rows(rows, f"{key}: {path!r}", prompt_column, answer_column, answer_pattern)


def check_rows(rows: list, where: str, prompt_column: str = "prompt", answer_column: str = "answer",
               answer_pattern: str | None = None) -> list[dict]:
    """Rows with ``prompt`` and ``answer`` as strings, or ``DataError`` naming ``where`` and the first bad
    row.
    ``answer_pattern``: a regex whose first group (or whole match) is the answer within the answer column
    (GSM8K's final number after ``####``); the column's full text stays as ``answer_text``."""
    if not rows:
        raise DataError(f"{where} holds no rows")
    pattern = re.compile(answer_pattern) if answer_pattern else None
    out = []
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{at}: expected an object with columns, got {type(row).__name__}")
        missing = [c for c in (prompt_column, answer_column) if c not in row]
        if missing:
            raise DataError(f"{at}: missing column(s) {missing}; columns present: {sorted(row)}")
        prompt, answer = row[prompt_column], row[answer_column]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{at}: column {prompt_column!r} must be a non-empty string, got {prompt!r}")
        if (isinstance(answer, bool) or not isinstance(answer, str | int | float)
                or (isinstance(answer, float) and not math.isfinite(answer))):
            raise DataError(f"{at}: column {answer_column!r} must be a string or a finite number, "
                            f"got {answer!r}")
        rest = {k: v for k, v in row.items() if k not in (prompt_column, answer_column)}
        if pattern is not None:
            found = pattern.search(str(answer))
            if found is None:
                raise DataError(f"{at}: task.answer_pattern {answer_pattern!r} finds no answer in column "
                                f"{answer_column!r} ({str(answer)[-80:]!r})")
            rest["answer_text"] = str(answer)
            answer = (found.group(1) if pattern.groups else found.group(0)).strip()
        out.append({**rest, "prompt": prompt, "answer": str(answer)})
    return out


def _read(path: Path, key: str) -> list:
    if path.is_dir():
        return _read_saved_dataset(path, key)
    if not path.is_file():
        raise DataError(f"{key}: {str(path)!r} does not exist")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{key}: {str(path)!r} has an unsupported suffix; use one of {list(SUFFIXES)} or a "
                        "save_to_disk directory")
    try:
        return reader(path, key)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file of any kind is bad input, not a crash
        raise DataError(f"{key}: cannot read {str(path)!r}: {type(e).__name__}: {e}") from None


def _read_jsonl(path: Path, key: str) -> list:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{key}: {str(path)!r} line {i + 1} is not valid JSON: {e.msg}") from None
    return rows


def _read_json(path: Path, key: str) -> list:
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise DataError(f"{key}: {str(path)!r} must hold a JSON list of rows")
    return data


def _read_table(path: Path, key: str) -> list:
    from datasets import Dataset

    return list(Dataset.from_parquet(str(path)) if path.suffix.lower() == ".parquet"
                else Dataset.from_csv(str(path)))


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_table, ".csv": _read_table}


def _read_saved_dataset(path: Path, key: str) -> list:
    from datasets import Dataset, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{key}: {str(path)!r} is not a datasets save_to_disk directory: {e}") from None
    if not isinstance(ds, Dataset):
        raise DataError(f"{key}: {str(path)!r} holds several splits {list(ds)}; "
                        "point at one split's directory")
    return list(ds)
