"""Streaming: a batch generated in chunks (``rollout.chunk_prompts``), each scored as soon as it is generated, trains
on the same samples as a batch generated in one call per worker, and the weight sync's probe is checked before
anything generated at the new weights trains."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from conftest import tiny_overrides
from test_faults import _samples, _trained_once, _weights

from opd.config import load_config
from opd.driver import run
from opd.rollout.pool import RolloutPool
from opd.rollout.stream import pieces

pytestmark = pytest.mark.slow

STEPS = 3


def test_pieces_cut_a_share_in_order():
    assert pieces(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert pieces(list(range(5)), 0) == [list(range(5))]
    assert pieces([], 3) == []


def test_chunked_stream_trains_the_same_samples(tiny_models, local_ray, tmp_path, monkeypatch):
    """Two workers, one step ahead: one call per worker per step vs one call per prompt. The chunks are really
    issued one prompt at a time, and the run trains the same samples (per-draw seeds) to the same weights."""
    overrides = {"trainer.total_steps": STEPS, "rollout.num_workers": 2, "rollout.max_staleness": 1,
                 "run.log_samples": "true", "checkpoint.every": 0}
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    run(load_config(None, tiny_overrides(tiny_models, whole, **overrides)), progress=False)

    sizes: list[int] = []
    issue = RolloutPool.issue

    def counting_issue(pool, chunk):
        sizes.append(len(chunk.draws))
        issue(pool, chunk)

    monkeypatch.setattr(RolloutPool, "issue", counting_issue)
    run(load_config(None, tiny_overrides(tiny_models, chunked, **overrides, **{"rollout.chunk_prompts": 1})), progress=False)

    assert sizes == [1] * 4 * STEPS  # 4 prompts a step, 2 per worker, 1 per call
    rows, ref_rows = _samples(chunked), _samples(whole)
    _trained_once(rows, STEPS, 8)
    assert [(r["uid"], r["response"], r["reward"]) for r in rows] == [(r["uid"], r["response"], r["reward"]) for r in ref_rows]
    ref = _weights(whole / "checkpoints" / f"step_{STEPS:06d}" / "model")
    got = _weights(chunked / "checkpoints" / f"step_{STEPS:06d}" / "model")
    for k in ref:  # a batch of one prompt and one of two may differ in the last float bits of the engines' scores
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=f"chunked run's weights differ at {k}")
    metrics = [json.loads(line) for line in (chunked / "metrics.jsonl").read_text().splitlines()]
    assert all(m["probe_max_diff"] < 1e-3 and "teacher_kl" in m for m in metrics)


def test_a_failed_probe_fails_the_run_before_its_weights_train(local_ray):
    """The pool's publish returns at once; waiting on it raises the worker's probe error, naming the version."""

    @ray.remote
    class _Worker:  # local: pickled by value, so the actor process needs no import of this test module
        def load(self, version):
            if version == 2:
                raise RuntimeError(f"weight version {version} failed the probe check")
            return 1e-7

    pool = RolloutPool([_Worker.remote(), _Worker.remote()])
    wait = pool.publish(1, lambda w: w.load.remote(1))
    assert wait() == pytest.approx(1e-7) and wait() == pytest.approx(1e-7)
    wait = pool.publish(2, lambda w: w.load.remote(2))
    with pytest.raises(ray.exceptions.RayTaskError, match="weight version 2 failed the probe check"):
        wait()
