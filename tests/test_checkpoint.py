"""Checkpoint state (``RunState``): written and read by name, and checkpoints of earlier opd versions still
resume."""

from __future__ import annotations

import json

import pytest

from opd.checkpoint import RunState, latest_checkpoint, load_state, save_checkpoint
from opd.data import Cursor

# state.json exactly as the driver wrote it before RunState owned its (de)serialisation (a58e65e..50fb00d),
# and as the first driver wrote it (5ef0754: no held-out teacher KL yet).
WRITTEN_BY_50FB00D = {"step": 3, "version": 3, "cursor": {"epoch": 1, "position": 4}, "accuracy_before": 0.25,
                      "teacher_accuracy": 0.5, "consumed": 24, "teacher_kl_before": 1.5}
WRITTEN_BY_5EF0754 = {k: v for k, v in WRITTEN_BY_50FB00D.items() if k != "teacher_kl_before"}


def _checkpoint(tmp_path, state: dict):
    ckpt = tmp_path / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps(state))
    (tmp_path / "checkpoints" / "latest").write_text(ckpt.name)
    return latest_checkpoint(tmp_path)


def test_state_of_earlier_versions_reads_by_name(tmp_path):
    st = load_state(_checkpoint(tmp_path / "a", WRITTEN_BY_50FB00D))
    assert st == RunState(3, 3, Cursor(1, 4), 0.25, 0.5, 24, 1.5)
    oldest = load_state(_checkpoint(tmp_path / "b", WRITTEN_BY_5EF0754))
    assert oldest == RunState(3, 3, Cursor(1, 4), 0.25, 0.5, 24, None)


def test_state_round_trips_in_the_layout_earlier_versions_read(tmp_path):
    """The keys and nesting are unchanged, so a checkpoint written now also resumes on the previous driver."""
    st = RunState(3, 3, Cursor(1, 4), 0.25, 0.5, 24, 1.5)
    final = save_checkpoint(tmp_path, st, lambda d: None, keep=2)
    assert json.loads((final / "state.json").read_text()) == WRITTEN_BY_50FB00D
    assert load_state(latest_checkpoint(tmp_path)) == st


def test_an_agent_jobs_state_keeps_its_episode_figures(tmp_path):
    st = RunState(3, 3, Cursor(1, 4), 0.25, 0.5, 24, 1.5, episodes_before={"tool_call_rate": 0.0},
                  teacher_episodes={"tool_call_rate": 1.0, "turns": 3.0})
    save_checkpoint(tmp_path, st, lambda d: None, keep=2)
    assert load_state(latest_checkpoint(tmp_path)) == st


def test_state_with_missing_or_unknown_keys_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"state\.json: .*missing keys \['consumed'\]"):
        load_state(_checkpoint(tmp_path / "a",
                               {k: v for k, v in WRITTEN_BY_50FB00D.items() if k != "consumed"}))
    with pytest.raises(ValueError, match=r"unknown keys \['buffer'\]"):
        load_state(_checkpoint(tmp_path / "b", {**WRITTEN_BY_50FB00D, "buffer": []}))
