"""The probe check: an engine that does not serve the learner's weights stops the run, naming the version."""

from __future__ import annotations

import pytest
import ray

from opd.rollout.weight_sync import TRANSFER
from opd.rollout.worker import RolloutWorker
from opd.trainer.learner import Learner

pytestmark = pytest.mark.slow


def test_probe_detects_stale_or_wrong_weights(tiny_models, local_ray):
    import torch

    student = str(tiny_models / "student")
    learner = Learner(student, lr=1e-3)
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(
        student, seed=0, max_model_len=32, kv_cache_gib=1, dtype="float32")
    probe = list(range(5, 20))
    # The same weights pass with an exact match.
    diff = ray.get(worker.load_weights.remote(learner.export_weights(), 1, probe,
                                              learner.probe_logprobs(probe), 1e-4))
    assert diff < 1e-4
    # The learner moves on but the engine receives the old weights: the probe must catch it.
    stale = learner.export_weights()
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(ray.exceptions.RayTaskError, match="weight version 2 failed the probe check"):
        ray.get(worker.load_weights.remote(stale, 2, probe, learner.probe_logprobs(probe), 1e-3))
    # The right weights then pass and the engine reports the new version's logprobs.
    assert ray.get(worker.load_weights.remote(TRANSFER.publish(learner.model.state_dict()), 2, probe,
                                              learner.probe_logprobs(probe), 1e-4)) < 1e-4
    ray.kill(worker)


def test_object_store_transfer_round_trips_buckets_dtypes_and_tied_tensors(local_ray):
    import torch

    from opd.rollout.weight_sync import ObjectStoreTransfer

    emb = torch.randn(10, 4)
    state = {"model.embed_tokens.weight": emb, "lm_head.weight": emb,  # tied: one storage under two names
             "model.norm.weight": torch.randn(4).to(torch.bfloat16),
             "model.layers.0.mlp.weight": torch.randn(300, 300),
             "model.layers.1.mlp.weight": torch.randn(300, 300)}
    transfer = ObjectStoreTransfer(bucket_bytes=300 * 300 * 4)
    handle = transfer.publish(state)
    assert len(handle.refs) == 2 and handle.aliases == {"model.embed_tokens.weight": ["lm_head.weight"]}
    assert handle.nbytes == 10 * 4 * 4 + 4 * 2 + 2 * 300 * 300 * 4  # the tied tensor travels once
    got = list(transfer.receive(handle))
    assert [k for k, _ in got] == list(state) and len(handle) == len(state)
    for k, v in got:
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    # published values are a snapshot, not a view of the learner's tensors
    state["model.layers.0.mlp.weight"].add_(1.0)
    assert not torch.equal(dict(transfer.receive(handle))["model.layers.0.mlp.weight"],
                           state["model.layers.0.mlp.weight"])
