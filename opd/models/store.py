"""Model directories that are complete or absent: built in a sibling directory, then renamed over the target.

An interrupted build never leaves a valid-looking half of a checkpoint, and a finished one replaces the old
one with at worst a moment where the target is absent, never mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def building(out_dir: Path) -> Iterator[Path]:
    """Yield an empty sibling of ``out_dir`` to build into; on success it replaces ``out_dir``, on error it is
    removed."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():  # move the old one aside first
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_stamp(out_dir: Path, name: str) -> dict | None:
    """The JSON record a builder wrote last into ``out_dir`` (so its presence means the build finished), or
    None."""
    try:
        return json.loads((Path(out_dir) / name).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def write_stamp(out_dir: Path, name: str, record: dict) -> dict:
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    (Path(out_dir) / name).write_text(text)
    return json.loads(text)  # exactly what a later cache hit reads back (lists, not tuples)
