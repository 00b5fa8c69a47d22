"""Weight sync of a LoRA student against a full-weights student: bytes sent and seconds per sync, with the
probe.

    python benchmarks/lora_sync.py                                   # demo student, r = 8, prints JSON
    python benchmarks/lora_sync.py --student PATH --ranks 8 64 --repeats 10

Each sync is what ``opd.steps.sync_weights`` does after a step: the learner exports (full state dict, or the
adapter's PEFT files), the bytes go through Ray's object store to a real vLLM rollout worker, which loads them
(in-place weight reload, or a new ``LoRARequest`` replacing the previous adapter) and re-scores the probe. The
learner takes one small step between syncs so every sync carries new weights. Ratios, not absolute times:
these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROBE = list(range(5, 25))


def _nudge(learner) -> None:
    import torch

    with torch.no_grad():
        for p in learner.model.parameters():
            if p.requires_grad:
                p.add_(1e-3 * torch.randn_like(p))
    learner.version += 1


def measure(student: str, lora_rank: int, repeats: int) -> dict:
    import ray

    from opd.rollout.worker import RolloutWorker
    from opd.trainer.learner import Learner
    from opd.trainer.lora import LoraSpec

    learner = Learner(student, lr=1e-3, lora=LoraSpec(r=lora_rank) if lora_rank else None)
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(
        student, seed=0, max_model_len=64, kv_cache_gib=1, dtype="float32", lora_rank=lora_rank
    )
    ray.get(worker.__ray_ready__.remote())
    export_s, load_s, total_s, sizes, diffs = [], [], [], [], []
    for i in range(repeats + 1):  # the first sync warms caches up and is not counted
        _nudge(learner)
        expected = learner.probe_logprobs(PROBE)
        t0 = time.perf_counter()
        payload = learner.export_adapter() if lora_rank else learner.export_weights()
        t1 = time.perf_counter()
        ref = ray.put(payload)
        load = worker.load_adapter if lora_rank else worker.load_weights
        diff = ray.get(load.remote(ref, learner.version, PROBE, expected, 1e-3))
        t2 = time.perf_counter()
        if i:
            export_s.append(t1 - t0)
            load_s.append(t2 - t1)
            total_s.append(t2 - t0)
            sizes.append(sum(len(v) for v in payload.values()) if lora_rank else payload.nbytes)
            diffs.append(diff)
    ray.kill(worker)
    return {
        "lora_rank": lora_rank,
        "params_total": sum(p.numel() for p in learner.model.parameters()),
        "params_synced": sum(p.numel() for p in learner.model.parameters() if p.requires_grad),
        "sync_bytes": statistics.median(sizes),
        "export_s_median": statistics.median(export_s),
        "load_and_probe_s_median": statistics.median(load_s),
        "sync_s_median": statistics.median(total_s),
        "probe_max_diff": max(diffs),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default=str(ROOT / "models/demo/student"))
    ap.add_argument("--ranks", type=int, nargs="+", default=[8])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import ray

    from opd.rollout.engine import ACTOR_ENV

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ACTOR_ENV},
             log_to_driver=False)
    try:
        full = measure(args.student, 0, args.repeats)
        loras = [measure(args.student, r, args.repeats) for r in args.ranks]
    finally:
        ray.shutdown()
    result = {
        "student": args.student,
        "full": full,
        "lora": loras,
        "ratios": [
            {
                "lora_rank": x["lora_rank"],
                "params_synced_over_total": x["params_synced"] / full["params_synced"],
                "bytes_lora_over_full": x["sync_bytes"] / full["sync_bytes"],
                "seconds_lora_over_full": x["sync_s_median"] / full["sync_s_median"],
            }
            for x in loras
        ],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
