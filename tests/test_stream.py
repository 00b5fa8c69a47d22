"""Streaming: a batch generated in chunks (``rollout.chunk_prompts``), each scored as soon as it is generated,
trains on the same samples as a batch generated in one call per worker, and the stream checks the weight
sync's probe before it hands out anything generated at the new weights."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import ray
import torch
from conftest import TWO_WORKERS, tiny_overrides
from test_faults import _samples, _trained_once, _weights

from opd.config import load_config
from opd.data import PromptSource
from opd.driver import run
from opd.rollout.pool import RolloutPool
from opd.rollout.stream import RolloutStream, pieces
from opd.types import Prompt, Sample, sample_uid

pytestmark = pytest.mark.slow


def test_pieces_cut_a_share_in_order():
    assert pieces(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert pieces(list(range(5)), 0) == [list(range(5))]
    assert pieces([], 3) == []


def test_chunked_stream_trains_the_same_samples(tiny_models, two_workers_run, tmp_path, monkeypatch):
    """Two workers, one step ahead: one call per worker per step vs one call per prompt. The chunks are really
    issued one prompt at a time, and the run trains the same samples (per-draw seeds) to the same weights."""
    steps, overrides = TWO_WORKERS["trainer.total_steps"], TWO_WORKERS
    whole, chunked = two_workers_run, tmp_path / "chunked"

    sizes: list[int] = []
    issue = RolloutPool.issue

    def counting_issue(pool, chunk):
        sizes.append(len(chunk.draws))
        issue(pool, chunk)

    monkeypatch.setattr(RolloutPool, "issue", counting_issue)
    run(load_config(None, tiny_overrides(tiny_models, chunked, **overrides, **{"rollout.chunk_prompts": 1})),
        progress=False)

    assert sizes == [1] * 4 * steps  # 4 prompts a step, 2 per worker, 1 per call
    rows, ref_rows = _samples(chunked), _samples(whole)
    _trained_once(rows, steps, 8)
    assert ([(r["uid"], r["response"], r["reward"]) for r in rows]
            == [(r["uid"], r["response"], r["reward"]) for r in ref_rows])
    ref = _weights(whole / "checkpoints" / f"step_{steps:06d}" / "model")
    got = _weights(chunked / "checkpoints" / f"step_{steps:06d}" / "model")
    # a batch of one prompt and one of two may differ in the last float bits of the engines' scores
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5,
                                   msg=f"chunked run's weights differ at {k}")
    metrics = [json.loads(line) for line in (chunked / "metrics.jsonl").read_text().splitlines()]
    assert all(m["probe_max_diff"] < 1e-3 and "teacher_kl" in m for m in metrics)


def test_take_hands_out_a_batch_only_after_the_last_syncs_probe_passed(local_ray, tmp_path):
    """The pool's publish returns at once; the stream checks the probe: ``take`` returns a batch generated at
    the new weights with that sync's probe difference, and a failed probe raises from ``take`` (nothing
    generated at those weights is trained), from ``save_in_flight`` (no checkpoint follows it) and from
    ``map`` (no evaluation)."""

    @ray.remote
    class _Worker:  # local: pickled by value, so the actor process needs no import of this test module
        def __init__(self):
            self.version = 0

        def generate(self, draws, *, n, temperature, top_p, max_tokens, seed, episodes=None):
            return [Sample(sample_uid(p.prompt_id, g, e), p, g, [5], "5", [-0.5], self.version)
                    for p, e in draws for g in range(n)], 0.01

        def load(self, version):
            if version == 2:
                raise RuntimeError(f"weight version {version} failed the probe check")
            self.version = version
            return 1e-7

        def echo(self, x):
            return x

    pool = RolloutPool([_Worker.remote(), _Worker.remote()])
    rollout = SimpleNamespace(max_staleness=0, prompts_per_step=2, group_size=2, temperature=1.0, top_p=1.0,
                              max_new_tokens=1, chunk_prompts=0, dynamic_sampling=False)
    stream = RolloutStream(pool, PromptSource([Prompt(f"p{i}", "", [1], "5") for i in range(4)], seed=0),
                           rollout, 0)
    assert pool.checked() is None  # nothing published yet: nothing to wait for
    pool.publish(1, lambda w: w.load.remote(1))
    taken = stream.take(0, 3)
    assert taken.probe_max_diff == pytest.approx(1e-7) and taken.batch.weight_version == 1
    pool.publish(2, lambda w: w.load.remote(2))
    failed = pytest.raises(ray.exceptions.RayTaskError, match="weight version 2 failed the probe check")
    with failed:
        stream.take(1, 3)
    with failed:
        stream.save_in_flight(str(tmp_path))
    assert not any(tmp_path.iterdir())
    with failed:
        pool.map(lambda w, x: w.echo.remote(x), [1, 2])
