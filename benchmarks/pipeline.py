"""Step time of the whole pipeline against its stages timed alone, synchronous and asynchronous, in one run.

    python benchmarks/pipeline.py                       # demo models and config, prints JSON
    python benchmarks/pipeline.py --steps 20 --repeats 10 rollout.prompts_per_step=64

Stages alone (each run by itself, the others idle): generate a batch, teacher scoring, verification, routing,
the learner's step, the weight sync with its probe. Then the same roles run the real loop
(``opd.driver.train``) with
``rollout.max_staleness`` 0 and 1. Targets: synchronous step <= 1.10 x the sum of the stages; asynchronous
step <= 1.15 x the slowest stage. Ratios, not absolute times: these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stages_alone(cfg, job, roles, repeats: int) -> dict[str, float]:
    import ray

    from opd.data import PromptSource
    from opd.plan import route_plan
    from opd.steps import _verify, sample, sync_weights
    from opd.trainer.routing import route

    cfg = cfg.model_copy(deep=True)
    cfg.rollout.chunk_prompts = 0  # each stage on the whole batch at once: its cheapest form
    data = PromptSource(job.train, cfg.run.seed)
    plan = route_plan(cfg)
    batch = sample(roles, data.next_batch(cfg.rollout.prompts_per_step), 0, cfg)
    scores = roles.teacher.submit(batch.samples, cfg.teacher.top_k).result() if roles.teacher else None
    rewards = _verify(roles, batch.samples)
    routed = route(batch, rewards, scores, plan, job.render)
    return {
        "generate": _timed(lambda: sample(roles, data.next_batch(cfg.rollout.prompts_per_step), 0, cfg),
                           repeats),
        "teacher_score": (_timed(lambda: roles.teacher.submit(batch.samples, cfg.teacher.top_k).result(),
                                 repeats)
                          if roles.teacher else 0.0),
        "verify": _timed(lambda: _verify(roles, batch.samples), repeats),
        "route": _timed(lambda: route(batch, rewards, scores, plan, job.render), repeats),
        "train_step": _timed(lambda: ray.get(roles.learner.train_step.remote(routed)), repeats),
        # Publishing returns at once; the stage is the loads and probes, so it is timed until they are
        # checked.
        "sync_weights": _timed(lambda: (sync_weights(roles, job.probe_ids, cfg.rollout.probe_tolerance),
                                        roles.rollout.checked()), repeats),
    }


def loop_step_seconds(cfg, job, roles, staleness: int, steps: int, skip: int, chunk_prompts: int) -> float:
    """Median step time of the real loop (``opd.driver.train``), warm-up steps dropped."""
    from opd.driver import train

    run_dir = Path(tempfile.mkdtemp(prefix=f"opd-pipeline-s{staleness}-"))
    cfg = cfg.model_copy(deep=True)
    cfg.rollout.max_staleness = staleness
    cfg.rollout.chunk_prompts = chunk_prompts
    cfg.trainer.total_steps = steps
    job.run_dir = run_dir
    t0 = time.perf_counter()
    train(cfg, job, roles, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Iteration time: what a run pays per step once the pipeline is full (the async loop's waits included).
    return statistics.median(r["step_seconds"] for r in rows[skip:]), wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--async-staleness", type=int, default=1,
                   help="rollout.max_staleness of the asynchronous loop")
    p.add_argument("--chunk-prompts", type=int, default=None,
                   help="rollout.chunk_prompts of both loops (default: the config's); "
                        "stages are timed unchunked")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from opd.cluster import init_ray, start_roles, stop_roles
    from opd.config import load_config
    from opd.driver import prepare

    overrides = ["eval.every=0", "eval.num_prompts=20", "checkpoint.every=0", *args.overrides]
    cfg = load_config(args.config, overrides)
    job = prepare(cfg.model_copy(
        update={"run": cfg.run.model_copy(update={"output_dir": tempfile.mkdtemp()})}))
    init_ray(cfg)
    roles = start_roles(cfg)
    try:
        stages = stages_alone(cfg, job, roles, args.repeats)
        chunk = cfg.rollout.chunk_prompts if args.chunk_prompts is None else args.chunk_prompts
        sync_step, sync_wall = loop_step_seconds(cfg, job, roles, 0, args.steps, 3, chunk)
        async_step, async_wall = loop_step_seconds(cfg, job, roles, args.async_staleness, args.steps, 3,
                                                   chunk)
    finally:
        stop_roles(roles)
    total, slowest = sum(stages.values()), max(stages.values())
    out = {
        "config": {"prompts_per_step": cfg.rollout.prompts_per_step, "group_size": cfg.rollout.group_size,
                   "algorithm": cfg.algorithm, "steps": args.steps, "repeats": args.repeats,
                   "async_staleness": args.async_staleness, "engine": cfg.rollout.engine,
                   "chunk_prompts": (cfg.rollout.chunk_prompts if args.chunk_prompts is None
                                     else args.chunk_prompts)},
        "stages_alone_s": {k: round(v, 4) for k, v in stages.items()},
        "stages_sum_s": round(total, 4),
        "slowest_stage": max(stages, key=stages.get),
        "slowest_stage_s": round(slowest, 4),
        "sync_step_s": round(sync_step, 4),
        "async_step_s": round(async_step, 4),
        "sync_over_sum": round(sync_step / total, 3),
        "async_over_slowest": round(async_step / slowest, 3),
        "async_speedup": round(sync_step / async_step, 3),
        "targets": {"sync_over_sum": 1.10, "async_over_slowest": 1.15},
        "loop_wall_s": {"sync": round(sync_wall, 1), "async": round(async_wall, 1)},
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
