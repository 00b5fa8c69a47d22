"""Faults a long run meets: a driver killed mid-run and resumed, or a rollout worker killed mid-step, ends
where an uninterrupted run ends, with every sample trained exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import ray
import torch
from conftest import TWO_WORKERS, tiny_overrides
from transformers import AutoModelForCausalLM

from opd import driver
from opd.checkpoint import latest_checkpoint, load_state
from opd.config import dump_config, load_config
from opd.driver import run
from opd.rollout.pool import RolloutPool
from opd.rollout.stream import IN_FLIGHT_FILE

pytestmark = pytest.mark.slow

STEPS = 3


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


# The driver process SIGKILLs its own process group (itself and the embedded Ray it owns) the moment its first
# checkpoint is written: a crash at a known step, however fast the steps run.
_DIE_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from opd import cli, driver
_save = driver.save_checkpoint
def _save_then_die(*args, **kwargs):
    _save(*args, **kwargs)
    os.killpg(0, signal.SIGKILL)
driver.save_checkpoint = _save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def _crash_after_first_checkpoint(args: list[str], timeout_s: float = 300) -> None:
    """Run the driver in its own process group and let it crash right after its first checkpoint."""
    proc = subprocess.Popen([sys.executable, "-c", _DIE_AFTER_FIRST_CHECKPOINT, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.wait(timeout=timeout_s) == -signal.SIGKILL, (
            f"the driver exited with code {proc.returncode}")
    finally:
        try:
            # whatever of the group is left (nothing, when it crashed as planned)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _samples(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def _trained_once(rows: list[dict], steps: int, per_step: int) -> None:
    """Every step trained ``per_step`` distinct ids; no id twice in the run; each drawn (prompt, epoch) has
    all G."""
    assert [r["step"] for r in rows] == [s for s in range(steps) for _ in range(per_step)]
    uids = [r["uid"] for r in rows]
    assert len(set(uids)) == len(uids), "a sample id was trained twice"
    groups: dict[str, set] = {}
    for u in uids:
        prompt_epoch, slot = u.rsplit("/", 1)
        groups.setdefault(prompt_epoch, set()).add(slot)
    assert all(slots == {"g0", "g1"} for slots in groups.values()), "a prompt lost one of its G samples"


def test_driver_sigkill_then_resume_matches_uninterrupted_run(tiny_models, local_ray, tmp_path):
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    overrides = {"trainer.total_steps": STEPS, "run.log_samples": "true"}
    run(load_config(None, tiny_overrides(tiny_models, ref_dir, **overrides)), progress=False)

    config = tmp_path / "killed.yaml"
    config.write_text(dump_config(load_config(None, tiny_overrides(tiny_models, killed_dir, **overrides))))
    _crash_after_first_checkpoint(["run", "--no-progress", str(config)])
    assert load_state(latest_checkpoint(killed_dir)).step == 1 and not (killed_dir / "summary.json").exists()

    summary = run(load_config(None, tiny_overrides(tiny_models, killed_dir, **overrides)), resume=True,
                  progress=False)
    assert summary["steps"] == STEPS
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS))  # the steps after the checkpoint were re-run and logged once
    # the sample record too: each sample once, the same samples
    assert _samples(killed_dir) == _samples(ref_dir)
    _trained_once(_samples(killed_dir), STEPS, 8)
    ref = _weights(ref_dir / "checkpoints" / f"step_{STEPS:06d}" / "model")
    got = _weights(killed_dir / "checkpoints" / f"step_{STEPS:06d}" / "model")
    for k in ref:
        assert torch.equal(ref[k], got[k]), (
            f"weights after kill + resume differ from the uninterrupted run at {k}")


def test_async_run_resumed_from_a_mid_run_checkpoint_matches_it(tiny_models, local_ray, tmp_path):
    """With generation running one step ahead, the batch in flight at a checkpoint is stored with it: resuming
    from that checkpoint trains on exactly the samples the uninterrupted run did, so the final weights are
    identical."""
    ref_dir = tmp_path / "async"
    overrides = {"trainer.total_steps": STEPS, "rollout.max_staleness": 1, "checkpoint.keep": STEPS}
    run(load_config(None, tiny_overrides(tiny_models, ref_dir, **overrides)), progress=False)
    staleness = [json.loads(line)["sample_staleness"]
                 for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert staleness == [0.0] + [1.0] * (STEPS - 1)  # step 0's batch was drawn before any update

    # A copy of the run as it stood at its step-1 checkpoint, as if the driver had died right after writing
    # it.
    cut = tmp_path / "cut"
    shutil.copytree(ref_dir, cut, ignore=shutil.ignore_patterns("step_00000[2-9]", "summary.json"))
    (cut / "checkpoints" / "latest").write_text("step_000001")
    assert (cut / "checkpoints" / "step_000001" / IN_FLIGHT_FILE).is_file()
    run(load_config(None, tiny_overrides(tiny_models, cut, **overrides)), resume=True, progress=False)
    ref = _weights(ref_dir / "checkpoints" / f"step_{STEPS:06d}" / "model")
    got = _weights(cut / "checkpoints" / f"step_{STEPS:06d}" / "model")
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"async resume differs from the uninterrupted run at {k}"


def test_rollout_workers_killed_mid_step_and_between_steps(tiny_models, two_workers_run, tmp_path,
                                                           monkeypatch):
    """Two rollout workers, generation one step ahead. Worker 1 is killed right after its share of a batch is
    launched (mid-generation), worker 0 between two steps (before the weight sync). Each is replaced, brought
    to the right weights, and regenerates exactly its lost share: the run trains the same samples as an
    uninterrupted one, none lost or duplicated, and ends with identical weights."""
    steps, overrides = TWO_WORKERS["trainer.total_steps"], TWO_WORKERS
    ref_dir, faulty_dir = two_workers_run, tmp_path / "faulty"

    issued, synced = {1: 0}, [0]
    issue, sync = RolloutPool.issue, driver.sync_weights

    def issue_then_kill(pool, chunk):
        issue(pool, chunk)
        if chunk.slot == 1:
            issued[1] += 1
            if issued[1] == 3:  # step 2's share, launched while the learner trains step 1
                ray.kill(ray.get_actor(f"{faulty_dir.name}/rollout-1"))

    def kill_then_sync(*args, **kwargs):
        synced[0] += 1
        if synced[0] == 3:  # after step 1's update, before its weights go out
            ray.kill(ray.get_actor(f"{faulty_dir.name}/rollout-0"))
        return sync(*args, **kwargs)

    monkeypatch.setattr(RolloutPool, "issue", issue_then_kill)
    monkeypatch.setattr(driver, "sync_weights", kill_then_sync)
    summary = run(load_config(None, tiny_overrides(tiny_models, faulty_dir, **overrides)), progress=False)

    assert summary["steps"] == steps
    metrics = [json.loads(line) for line in (faulty_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["rollout_worker_restarts"] == 2.0
    rows = _samples(faulty_dir)
    _trained_once(rows, steps, 8)
    assert rows == _samples(ref_dir), "the replacement workers did not regenerate exactly the lost samples"
    ref = _weights(ref_dir / "checkpoints" / f"step_{steps:06d}" / "model")
    got = _weights(faulty_dir / "checkpoints" / f"step_{steps:06d}" / "model")
    for k in ref:
        assert torch.equal(ref[k], got[k]), (
            f"weights after worker restarts differ from the uninterrupted run at {k}")


def test_rollout_worker_restarts_are_bounded(local_ray):
    """A dead worker is replaced under its own name until rollout.max_restarts is used up; then the call fails
    with a message naming the key. (A plain actor stands in for the engine: the pool only starts, kills and
    calls.)"""

    class _Worker:  # local: pickled by value, so the actor process needs no import of this test module
        def echo(self, x):
            return x

    def kill(actor) -> None:
        """ray.kill only asks for the kill: wait until the actor is dead, or a call may still reach it."""
        ray.kill(actor)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ray.get(actor.echo.remote(0), timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return
            time.sleep(0.1)
        raise AssertionError("the killed actor still answers")

    start = lambda i: ray.remote(_Worker).options(name=f"bounded/rollout-{i}", num_cpus=0).remote()  # noqa: E731
    pool = RolloutPool([start(0)], start, max_restarts=1)
    kill(ray.get_actor("bounded/rollout-0"))
    assert pool.map(lambda w, x: w.echo.remote(x), [7]) == [7]  # re-issued on the replacement
    assert pool.restarts == 1 and ray.get_actor("bounded/rollout-0")._actor_id == pool[0]._actor_id
    kill(pool[0])
    with pytest.raises(RuntimeError, match=r"rollout worker 0 died .*rollout\.max_restarts=1"):
        pool.map(lambda w, x: w.echo.remote(x), [7])
