"""Checkpoints that are either complete or absent: written to a temporary directory, then renamed.

Layout: ``RUN_DIR/checkpoints/step_000010/{model/, optimizer.pt, rng.pt, learner.json, state.json}`` and
``RUN_DIR/checkpoints/latest`` naming the newest complete one. ``state.json`` is ``RunState``: where the
driver stands; the learner and the rollout stream write their own files beside it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from opd.data import Cursor


@dataclass
class RunState:
    """The driver's position in a run and the held-out figures measured before training (a resume reuses
    them)."""

    step: int = 0
    version: int = 0
    cursor: Cursor = field(default_factory=Cursor)
    accuracy_before: float | None = None
    teacher_accuracy: float | None = None
    consumed: int = 0
    teacher_kl_before: float | None = None  # held-out KL(student || teacher) per token before training
    episodes_before: dict = field(default_factory=dict)  # agent jobs: the student's greedy episodes' figures
    teacher_episodes: dict = field(default_factory=dict)  # agent jobs: the teacher's

    # Keys every checkpoint has held since the first; later fields are optional so older checkpoints still
    # resume.
    REQUIRED = ("step", "version", "cursor", "accuracy_before", "teacher_accuracy", "consumed")

    def to_dict(self) -> dict:
        """Empty episode figures are left out: a single-turn job's state keeps the layout earlier drivers read
        (an agent job's state never could be resumed by a driver without agents)."""
        optional = ("episodes_before", "teacher_episodes")
        return {k: v for k, v in asdict(self).items() if v or k not in optional}

    @classmethod
    def from_dict(cls, state: dict) -> RunState:
        """A state as any opd version wrote it: a field added since (``teacher_kl_before``) takes its default;
        an unknown key is refused rather than dropped (a newer opd's state would resume wrong)."""
        names = {f.name for f in fields(cls)}
        missing = [k for k in cls.REQUIRED if k not in state]
        unknown = sorted(set(state) - names)
        if missing or unknown:
            raise ValueError(f"checkpoint state: missing keys {missing}, unknown keys {unknown}")
        return cls(**{**state, "cursor": Cursor(**state["cursor"])})


def _root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, state: RunState, save_files: Callable[[str], None], keep: int) -> Path:
    """Checkpoint ``state.step``: ``save_files(directory)`` writes the learner's and the stream's files
    first."""
    root = _root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    tmp = root / f".tmp-step_{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_files(str(tmp))
    (tmp / "state.json").write_text(json.dumps(state.to_dict()))
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


def load_state(ckpt: Path) -> RunState:
    try:
        return RunState.from_dict(json.loads((ckpt / "state.json").read_text()))
    except ValueError as e:
        raise ValueError(f"{ckpt / 'state.json'}: {e}") from e
