"""Rows from a ``datasets`` dataset, named as recipes name them (``openai/gsm8k``, config ``main``, split
``train``): loaded with ``datasets.load_dataset`` from its cache (``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``
honoured), from the hub, or from a local directory laid out like a hub dataset repo (``README.md`` naming its
configs, ``main/train-*.parquet``, ...).

    task:
      name: hub
      dataset: openai/gsm8k        # ORG/NAME[@REVISION], or a local directory
      dataset_config: main
      prompt_column: question
      answer_column: answer
      answer_pattern: '####\\s*(.+)$'   # GSM8K: the final number after ####
"""

from __future__ import annotations

from contextlib import contextmanager

from opd.tasks.files import DataError


def load_split(dataset: str, config: str | None, split: str, split_key: str) -> list[dict]:
    """One split's rows as dicts, or ``DataError`` naming the key at fault (``task.dataset``,
    ``task.dataset_config`` or ``split_key``), the dataset and what is wrong."""
    import datasets

    name, _, revision = dataset.partition("@")
    try:
        with _offline_if_asked(datasets):
            ds = datasets.load_dataset(name, config, split=split, revision=revision or None)
    except ValueError as e:  # an unknown config or split: datasets lists the valid ones
        key = "task.dataset_config" if "BuilderConfig" in str(e) else split_key
        raise DataError(f"{key}: {dataset!r}, config {config!r}, split {split!r}: {e}") from None
    except (ConnectionError, FileNotFoundError, OSError) as e:
        raise DataError(f"task.dataset: {dataset!r} is not a local dataset directory and cannot be loaded "
                        f"from the cache or the hub ({type(e).__name__}: {str(e)[:200]})") from None
    except Exception as e:  # noqa: BLE001 - a dataset that cannot be read is bad input, not a crash
        why = f"{type(e).__name__}: {str(e)[:200]}"
        raise DataError(f"task.dataset: {dataset!r}, config {config!r}, split {split!r}: cannot be loaded: "
                        f"{why}") from None
    return list(ds)


@contextmanager
def _offline_if_asked(datasets):
    """``HF_HUB_OFFLINE`` honoured even when it was set after ``datasets`` read its settings (at import)."""
    from opd.models.hub import offline

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or offline()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before
