"""Faults a long run meets: the driver killed with SIGKILL mid-run, then resumed, ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_overrides
from transformers import AutoModelForCausalLM

from opd.checkpoint import latest_checkpoint, load_state
from opd.config import dump_config, load_config
from opd.driver import run

pytestmark = pytest.mark.slow

STEPS = 3


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def _kill_after_first_checkpoint(cmd: list[str], run_dir, timeout_s: float = 300) -> None:
    """Start the driver in its own process group (it owns an embedded Ray), SIGKILL the group once a checkpoint lands."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pointer = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout_s
    try:
        while not pointer.is_file():
            assert proc.poll() is None, f"the driver exited early with code {proc.returncode}"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_driver_sigkill_then_resume_matches_uninterrupted_run(tiny_models, local_ray, tmp_path):
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    overrides = {"trainer.total_steps": STEPS}
    run(load_config(None, tiny_overrides(tiny_models, ref_dir, **overrides)), progress=False)

    config = tmp_path / "killed.yaml"
    config.write_text(dump_config(load_config(None, tiny_overrides(tiny_models, killed_dir, **overrides))))
    _kill_after_first_checkpoint([sys.executable, "-m", "opd.cli", "run", "--no-progress", str(config)], killed_dir)
    done = load_state(latest_checkpoint(killed_dir))["step"]
    assert 1 <= done < STEPS and not (killed_dir / "summary.json").exists()

    summary = run(load_config(None, tiny_overrides(tiny_models, killed_dir, **overrides)), resume=True, progress=False)
    assert summary["steps"] == STEPS
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS))  # the steps after the checkpoint were re-run and logged once
    ref = _weights(ref_dir / "checkpoints" / f"step_{STEPS:06d}" / "model")
    got = _weights(killed_dir / "checkpoints" / f"step_{STEPS:06d}" / "model")
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"weights after kill + resume differ from the uninterrupted run at {k}"
