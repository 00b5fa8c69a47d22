"""Learner ranks sharded (FSDP2) against replicas (ddp) and one rank, on a real checkpoint, side by side in
one run.

    python benchmarks/fsdp.py --model models/smollm2 --out benchmarks/results/fsdp_smollm2.json
    python benchmarks/fsdp.py --model models/demo/student --steps 2                 # the tiny demo student

Per configuration (1 rank; 2 gloo ranks as ddp; 2 as fsdp2), each in fresh processes on 127.0.0.1 without Ray
(the ranks are driven as rank 0 drives its peers in a job): the bytes each rank holds for the student's
weights, gradients and AdamW state (counted from the tensors: a shard counts its local slice), the peak RSS of
each rank's process, the seconds per step, and the largest difference of the final weights from the 1-rank
run. The batch is 16 samples of the task's kind of lengths (prompts of 40-60 tokens, 16-token responses),
sampled-token OPD against a synthetic teacher; what is measured depends on the shapes, not on the words.
Prints JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opd.rollout.weight_sync import whole  # noqa: E402
from opd.trainer.dist import free_port  # noqa: E402
from opd.trainer.learner import Learner  # noqa: E402
from opd.types import TrainBatch  # noqa: E402


def batch(vocab: int, n: int, seed: int) -> TrainBatch:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(40, 60))] for _ in range(n // 2)]
    prompts = [p for p in prompts for _ in range(2)]  # groups of 2 samples per prompt
    responses = [[rng.randrange(10, vocab) for _ in range(16)] for _ in range(n)]
    sampler = [[-rng.uniform(0.5, 6.0) for _ in r] for r in responses]
    teacher = [[s - rng.uniform(-1, 1) for s in row] for row in sampler]
    return TrainBatch(uids=[f"b{seed}u{i}" for i in range(n)], prompt_ids=prompts, response_ids=responses,
                      sampler_logprobs=sampler, advantages=[[0.0] * len(r) for r in responses],
                      teacher_logprobs=teacher,
                      objective="opd")


def held_bytes(learner: Learner) -> dict[str, int]:
    """Bytes of this rank's weights, gradients and AdamW state; a shard's local slice for a DTensor."""
    def size(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(learner.model.parameters())
    state = [v for s in learner.opt.state.values() for v in s.values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"weights": sum(map(size, params)),
            "grads": sum(size(p.grad) for p in params if p.grad is not None),
            "adam_state": sum(map(size, state))}


def rank_main(rank: int, world: int, strategy: str, model: str, steps: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    learner = Learner(model, lr=1e-5, micro_batch_size=4, seed=0, device="cpu")
    if world > 1:
        learner.join_group(rank, world, "127.0.0.1", port, "gloo", strategy)
    vocab = learner.model.config.vocab_size
    seconds = []
    for step in range(steps):
        parts, _ = learner.shards(batch(vocab, 16, step), world)
        t0 = time.perf_counter()
        learner.train_shard(*parts[rank])
        seconds.append(time.perf_counter() - t0)
    held = held_bytes(learner)  # gradients are kept after the step (zeroed at the next one)
    weights = {k: whole(v).detach().clone() for k, v in learner.model.state_dict().items()}
    result = {"rank": rank, "held_mib": {k: v / 2**20 for k, v in held.items()},
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "step_seconds": seconds}
    torch.save({"result": result, "weights": weights if rank == 0 else None},
               Path(out) / f"{strategy}-{world}-{rank}.pt")


def _entry(rank: int, *args) -> None:
    rank_main(rank, *args)


def main() -> None:
    from emit import emit  # beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/smollm2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = {"model": args.model, "steps": args.steps,
              "batch": "16 samples, 40-60 prompt + 16 response tokens",
              "machine": f"{os.cpu_count()} cores, torch {torch.__version__}", "runs": {}}
    with tempfile.TemporaryDirectory(prefix="opd-fsdp-bench-") as tmp:
        for strategy, world in (("single", 1), ("ddp", 2), ("fsdp2", 2)):
            mp.spawn(_entry, args=(world, strategy, args.model, args.steps, free_port(), tmp), nprocs=world,
                     join=True)
            ranks = [torch.load(Path(tmp) / f"{strategy}-{world}-{r}.pt", weights_only=False)
                     for r in range(world)]
            report["runs"][strategy] = {"ranks": [r["result"] for r in ranks]}
            report["runs"][strategy]["weights"] = ranks[0]["weights"]
    base = report["runs"]["single"].pop("weights")
    for name in ("ddp", "fsdp2"):
        w = report["runs"][name].pop("weights")
        report["runs"][name]["max_abs_diff_vs_single"] = max(float((w[k] - base[k]).abs().max())
                                                             for k in base)
    held = {n: sum(report["runs"][n]["ranks"][0]["held_mib"].values()) for n in report["runs"]}
    step = {n: (sum(r["step_seconds"][-1] for r in report["runs"][n]["ranks"])
                / len(report["runs"][n]["ranks"]))
            for n in report["runs"]}
    report["ratios"] = {
        "fsdp2_over_ddp_held_bytes_per_rank": held["fsdp2"] / held["ddp"],
        "fsdp2_over_ddp_peak_rss_rank0": (report["runs"]["fsdp2"]["ranks"][0]["peak_rss_mib"]
                                          / report["runs"]["ddp"]["ranks"][0]["peak_rss_mib"]),
        "fsdp2_over_ddp_step_seconds": step["fsdp2"] / step["ddp"],
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
