"""Faults a long run meets: a driver killed mid-run and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
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
from opd.rollout.stream import IN_FLIGHT_FILE

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


def test_async_run_resumed_from_a_mid_run_checkpoint_matches_it(tiny_models, local_ray, tmp_path):
    """With generation running one step ahead, the batch in flight at a checkpoint is stored with it: resuming from
    that checkpoint trains on exactly the samples the uninterrupted run did, so the final weights are identical."""
    ref_dir = tmp_path / "async"
    overrides = {"trainer.total_steps": STEPS, "rollout.max_staleness": 1, "checkpoint.keep": STEPS}
    run(load_config(None, tiny_overrides(tiny_models, ref_dir, **overrides)), progress=False)
    staleness = [json.loads(line)["sample_staleness"] for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert staleness == [0.0] + [1.0] * (STEPS - 1)  # step 0's batch was drawn before any update

    # A copy of the run as it stood at its step-1 checkpoint, as if the driver had died right after writing it.
    cut = tmp_path / "cut"
    shutil.copytree(ref_dir, cut, ignore=shutil.ignore_patterns("step_00000[2-9]", "summary.json"))
    (cut / "checkpoints" / "latest").write_text("step_000001")
    assert (cut / "checkpoints" / "step_000001" / IN_FLIGHT_FILE).is_file()
    run(load_config(None, tiny_overrides(tiny_models, cut, **overrides)), resume=True, progress=False)
    ref = _weights(ref_dir / "checkpoints" / f"step_{STEPS:06d}" / "model")
    got = _weights(cut / "checkpoints" / f"step_{STEPS:06d}" / "model")
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"async resume differs from the uninterrupted run at {k}"
