"""Checkpoints that are either complete or absent: written to a temporary directory, then renamed.

Layout: ``RUN_DIR/checkpoints/step_000010/{model/, optimizer.pt, rng.pt, learner.json, state.json}`` and
``RUN_DIR/checkpoints/latest`` naming the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, save_learner: Callable[[str], None], state: dict, keep: int) -> Path:
    root = _root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_learner(str(tmp))
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = _root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = _root(run_dir) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())
