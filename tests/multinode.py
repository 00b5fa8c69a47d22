"""Learner ranks on a simulated two-node Ray cluster, in a process of its own (driven by
tests/test_learner_ranks.py).

``ray.cluster_utils.Cluster`` starts a head and one worker node (separate raylets, as on two machines) and
this process connects to it, so the test session's own local Ray is never touched. Results go to OUT_DIR as
JSON.

    python tests/multinode.py MODELS_DIR OUT_DIR [equivalence] [job]
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table, remove_placement_group

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_overrides  # noqa: E402

from opd.cluster import connect_learners, start_learners  # noqa: E402
from opd.config import load_config  # noqa: E402
from opd.driver import run  # noqa: E402
from opd.plan import objective_spec  # noqa: E402
from opd.rollout.engine import ACTOR_ENV  # noqa: E402
from opd.rollout.weight_sync import TRANSFER  # noqa: E402
from opd.trainer.learner import Learner  # noqa: E402
from opd.trainer.shards import balance_shards  # noqa: E402
from opd.types import TrainBatch  # noqa: E402

# (algorithm, strategy): every family sharded (the default), and replicas once.
RUNS = {"opd": ("opd", "fsdp2", {}), "grpo": ("grpo", "fsdp2", {}),
        "srpo": ("srpo", "fsdp2", {"sdpo.top_k": 8}), "opd-ddp": ("opd", "ddp", {})}


def make_batch(learner: Learner, algorithm: str, n: int, seed: int) -> TrainBatch:
    """A fixed batch like tests/test_learner.py's: sampler log-probs from the learner, a noisy teacher, mixed
    lengths, per-sample weights, and for SRPO routes with self-teacher prompts. Deterministic in ``seed``."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(6, 90) for _ in range(rng.randint(3, 9))] for _ in range(n)]
    responses = [[rng.randrange(6, 90) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    sampler = [learner.probe_logprobs(p + r)[len(p) - 1 :] for p, r in zip(prompts, responses, strict=True)]
    teacher = [[x - rng.uniform(-1, 1) for x in s] for s in sampler]
    adv = [[-(s - t) for s, t in zip(srow, trow, strict=True)]
           for srow, trow in zip(sampler, teacher, strict=True)]
    if algorithm == "grpo":
        adv = [[(-1) ** i * 0.7] * len(r) for i, r in enumerate(responses)]
    sd = algorithm == "srpo"
    return TrainBatch(
        uids=[f"s{seed}u{i}" for i in range(n)], prompt_ids=prompts, response_ids=responses,
        sampler_logprobs=sampler, advantages=adv, teacher_logprobs=teacher, objective=algorithm,
        loss_weights=[(1.0, 0.5, 2.0, 0.0)[i % 4] for i in range(n)],
        teacher_prompt_ids=([(p + [30, 31, 32] if i % 3 else None) for i, p in enumerate(prompts)]
                            if sd else None),
        routes=[("sdpo" if i % 3 else "grpo") for i in range(n)] if sd else None,
    )


def _weights(actor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in TRANSFER.receive(ray.get(actor.export_weights.remote()))}


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |a-b|, max over tensors of max|a-b| / max|a|): the second is scale-free per tensor."""
    abs_d = max(float((a[k] - b[k]).abs().max()) for k in a)
    rel_d = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)) for k in a)
    return abs_d, rel_d


def equivalence(models: Path, out: Path, address: str) -> dict:
    results = {}
    for name, (algorithm, strategy, extra) in RUNS.items():
        t0 = time.perf_counter()
        overrides = {"algorithm": algorithm, "trainer.num_ranks": 2,
                     "trainer.placement_strategy": "STRICT_SPREAD",
                     "trainer.micro_batch_size": 4, "trainer.lr": 1e-3, "cluster.address": address,
                     "trainer.strategy": strategy, "run.name": f"eq-{name}", **extra}
        cfg = load_config(None, tiny_overrides(models, out / algorithm, **overrides))
        t = cfg.trainer
        # The same arguments as opd.cluster.start_learners gives every rank.
        single = Learner(cfg.models.student, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                         warmup_steps=t.warmup_steps, grad_clip=t.grad_clip,
                         micro_batch_size=t.micro_batch_size,
                         torch_threads=t.torch_threads, seed=cfg.run.seed, objective=objective_spec(cfg))
        # fixed before either learner trains
        batches = [make_batch(single, algorithm, n=16, seed=s) for s in (0, 1)]
        group = start_learners(cfg)
        ray.get([r.__ray_ready__.remote() for r in group.ranks])
        connect_learners(group, t.dist_backend, t.strategy)
        rank0, rank1 = group.ranks
        steps = []
        for b in batches:
            one, two = single.train_step(b), ray.get(rank0.train_step.remote(b))
            steps.append({k: (one[k], two[k]) for k in ("loss", "grad_norm", "entropy", "train_tokens",
                                                        "loss_tokens", "update_skipped")}
                         | {"shard_token_imbalance": (one["shard_token_imbalance"],
                                                      two["shard_token_imbalance"])})
        # Rank 0's export is what the engines load (sharded, rank 1 joins its gathers); replicas each export
        # theirs.
        w_single, w0 = single.model.state_dict(), _weights(rank0)
        w1 = _weights(rank1) if strategy == "ddp" else w0
        abs_d, rel_d = _rel_diff(w_single, w0)
        res = {
            "strategy": strategy, "max_abs_diff": abs_d, "max_rel_diff": rel_d, "steps": steps,
            "ranks_identical": all(torch.equal(w0[k], w1[k]) for k in w0),
            "versions": [single.version, *ray.get([r.version_number.remote() for r in group.ranks])],
            "nodes": sorted(set(placement_group_table(group.placement_group)["bundles_to_node_id"].values())),
        }
        if algorithm == "opd":
            res |= _skip_and_load(single, batches[0], rank0, rank1, w0, out / name, strategy)
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
        for r in group.ranks:
            ray.kill(r)
        remove_placement_group(group.placement_group)
    return results


def _skip_and_load(single: Learner, batch: TrainBatch, rank0, rank1, w_before: dict, out: Path,
                   strategy: str) -> dict:
    """A NaN in a sample that lands on rank 1 skips the update on both ranks; then rank 0's load restores both
    (replicas: each rank's own export; shards: rank 0's, which gathers rank 1's half)."""
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)]
    on_rank1 = balance_shards(lengths, 2)[1][0]
    batch.teacher_logprobs[on_rank1][0] = float("nan")
    stats = ray.get(rank0.train_step.remote(batch))
    ranks = (rank0, rank1) if strategy == "ddp" else (rank0,)
    unchanged = [all(torch.equal(w_before[k], w[k]) for k in w_before) for w in map(_weights, ranks)]
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True)
    # a third step, so the checkpoint differs from the ranks
    single.train_step(make_batch(single, "opd", n=8, seed=7))
    single.save(str(ckpt))
    ray.get(rank0.load.remote(str(ckpt)))
    w_ckpt = single.model.state_dict()
    loaded = [all(torch.equal(w_ckpt[k], w[k]) for k in w_ckpt) for w in map(_weights, ranks)]
    return {"nan_skipped": stats["update_skipped"], "nan_unchanged": unchanged, "load_restored": loaded,
            "loaded_versions": ray.get([rank0.version_number.remote(), rank1.version_number.remote()])}


def job(models: Path, out: Path, address: str) -> dict:
    t0 = time.perf_counter()
    overrides = {"trainer.num_ranks": 2, "trainer.placement_strategy": "STRICT_SPREAD",
                 "cluster.address": address}
    summary = run(load_config(None, tiny_overrides(models, out / "job", **overrides)), progress=False)
    return {"summary": summary, "run_dir": str(out / "job"), "seconds": time.perf_counter() - t0}


def main() -> None:
    models, out, parts = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Two raylets on one machine: the learner ranks' placement group (STRICT_SPREAD) must use both.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": ACTOR_ENV}, log_to_driver=True)
        (out / "cluster.json").write_text(json.dumps({"seconds": time.perf_counter() - t0,
                                                      "nodes": len(ray.nodes())}))
        for part in parts:
            result = {"equivalence": equivalence, "job": job}[part](models, out, cluster.address)
            (out / f"{part}.json").write_text(json.dumps(result, indent=1, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
