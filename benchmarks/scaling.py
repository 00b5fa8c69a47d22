"""How the learner's step time and peak memory grow with batch size and response length, with and without TIP
token selection. Drives the real ``opd.trainer.learner.Learner`` in-process on CPU (no Ray, no engines) on
synthetic OPD batches, one fresh process per configuration.

    python benchmarks/scaling.py              # default grid (~2-3 min on 2 cores);
                                              # writes benchmarks/results/scaling.json
    python benchmarks/scaling.py --quick      # smoke run: a 2x2 grid, one timed step; prints only

Memory: each configuration runs in its own process, forked from a server that has already imported torch, so
no configuration inherits another's allocator state. Right before the first step the process's RSS high-water
mark is reset to its current RSS (``/proc/self/clear_refs`` = 5); ``peak_rss_mib`` is ``VmHWM`` after the
steps and
``step_rss_mib`` is that peak minus the RSS at the reset: the memory the steps themselves added (activations,
gradients, AdamW state, allocator slack), counted as the OS sees it, which is the honest measure for CPU
tensors. Where clear_refs is not writable it falls back to ``ru_maxrss`` (then ``step_rss_mib`` includes the
setup).
``activation_mib`` is the learner's own count of tensors saved for backward
(``opd.trainer.memory.ActivationMeter``): deterministic, so it shows the shape of the growth where RSS is
noisy.

Exponents: least-squares slope of log(y) on log(x) over each sweep, i.e. y ~ x^k. Time on a tiny model carries
a fixed per-step overhead (optimizer, Python), so its exponents sit below 1 until the tokens dominate.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "scaling.json"
SELECTIONS = {"none": None, "entropy_sample": ("entropy_sample", 0.5)}
PROMPT_LEN = 8


def _proc_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _batch(batch: int, response_len: int, vocab: int, seed: int):
    from opd.types import TrainBatch

    rng = random.Random(seed)
    prompts = [[rng.randrange(6, vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]
    responses = [[rng.randrange(6, vocab) for _ in range(response_len)] for _ in range(batch)]
    # Synthetic log-probs: their values change the loss, not the work, which is what is measured here.
    sampler = [[-rng.uniform(0.1, 3.0) for _ in r] for r in responses]
    teacher = [[s - rng.uniform(-1.0, 1.0) for s in row] for row in sampler]
    adv = [[t - s for s, t in zip(srow, trow, strict=True)]
           for srow, trow in zip(sampler, teacher, strict=True)]
    return TrainBatch(uids=[f"u{i}" for i in range(batch)], prompt_ids=prompts, response_ids=responses,
                      sampler_logprobs=sampler, advantages=adv, teacher_logprobs=teacher, objective="opd")


def run_config(model: str, batch: int, response_len: int, selection: str, steps: int, threads: int,
               micro: int) -> dict:
    """One configuration, in a fresh process: a small warm-up step, one untimed full step, ``steps`` timed
    steps."""
    from transformers.utils import logging as hf_logging

    from opd.plan import spec_of
    from opd.trainer.learner import Learner

    hf_logging.disable_progress_bar()
    sel = SELECTIONS[selection]
    spec = spec_of(f"selection.mode={sel[0]}", f"selection.keep_ratio={sel[1]}") if sel else spec_of()
    learner = Learner(model, lr=1e-4, micro_batch_size=micro or batch, torch_threads=threads, objective=spec)
    vocab = learner.model.config.vocab_size
    batches = [_batch(batch, response_len, vocab, seed) for seed in range(steps + 1)]
    # Warm-up on a 1x2 batch, outside the memory window: lazily loaded kernels and AdamW's state are a fixed
    # cost, not part of how a step grows. Small, so it leaves no freed activations for the measured steps to
    # reuse.
    learner.train_step(_batch(1, 2, vocab, seed=-1))
    import gc

    gc.collect()
    exact = _reset_peak()
    rss0 = _proc_kib("VmRSS") or 0
    learner.train_step(batches[0])  # the first full-size step is inside the memory window but not timed
    times, stats = [], []
    for b in batches[1:]:
        t0 = time.perf_counter()
        stats.append(learner.train_step(b))
        times.append(time.perf_counter() - t0)
    hwm = _proc_kib("VmHWM") if exact else None
    peak_kib = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sec = sorted(times)[len(times) // 2]  # median: the machine is shared, a mean would carry others' bursts
    return {
        "batch": batch, "response_len": response_len, "prompt_len": PROMPT_LEN, "selection": selection,
        "seconds_per_step": round(sec, 4), "tokens_per_s": round(batch * response_len / sec, 1),
        "train_tokens": stats[-1]["train_tokens"], "activation_mib": round(stats[-1]["activation_mib"], 3),
        "peak_rss_mib": round(peak_kib / 1024, 1), "step_rss_mib": round((peak_kib - rss0) / 1024, 1),
        "peak_method": "VmHWM after clear_refs" if hwm is not None else "ru_maxrss",
    }


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x); None with fewer than two usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx, 3) if sxx else None


def _grid(args) -> tuple[list[int], list[int], int, int]:
    if args.quick:
        return [4, 8], [8, 16], 8, 8
    # (batches, lengths, fixed length, fixed batch)
    return [8, 16, 32, 64, 128, 256], [8, 16, 32, 64, 112], 32, 32


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "demo" / "student"))
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration (default 5; 1 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each configuration's process")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="learner micro_batch_size (0: the whole batch at once)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a 2x2 grid, one timed step, nothing written")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)}; "
                   "none with --quick)")
    args = p.parse_args(argv)
    steps = args.steps or (1 if args.quick else 5)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    batches, lengths, fixed_len, fixed_batch = _grid(args)
    max_pos = json.loads((Path(args.model) / "config.json").read_text()).get("max_position_embeddings", 10**9)
    if PROMPT_LEN + max(lengths) > max_pos:
        raise SystemExit(f"--model: max_position_embeddings={max_pos} < "
                         f"{PROMPT_LEN + max(lengths)} tokens per sample")

    points = sorted({(b, fixed_len) for b in batches} | {(fixed_batch, t) for t in lengths})
    ctx = mp.get_context("forkserver")
    # import once, fork per config
    ctx.set_forkserver_preload(["torch", "transformers", "opd.trainer.learner"])
    t_all = time.perf_counter()
    results = []
    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
        for sel in SELECTIONS:
            for b, t in points:
                r = pool.submit(run_config, args.model, b, t, sel, steps, args.threads,
                                args.micro_batch).result()
                print(json.dumps(r), file=sys.stderr, flush=True)
                results.append(r)

    def series(sel: str, key: str, vary: str) -> tuple[list, list]:
        fixed = ("response_len", fixed_len) if vary == "batch" else ("batch", fixed_batch)
        rows = sorted((r for r in results if r["selection"] == sel and r[fixed[0]] == fixed[1]),
                      key=lambda r: r[vary])
        return [r[vary] for r in rows], [r[key] for r in rows]

    exponents = {
        vary: {sel: {key: fit_exponent(*series(sel, key, vary))
                     for key in ("seconds_per_step", "step_rss_mib", "peak_rss_mib", "activation_mib")}
               for sel in SELECTIONS}
        for vary in ("batch", "response_len")
    }
    by = {(r["selection"], r["batch"], r["response_len"]): r for r in results}
    ratios = [{"batch": b, "response_len": t,
               **{f"{k}_ratio": round(by["entropy_sample", b, t][k] / by["none", b, t][k], 3)
                  if by["none", b, t][k] else None
                  for k in ("seconds_per_step", "step_rss_mib", "activation_mib", "train_tokens")}}
              for b, t in points]
    import torch

    report = {
        "what": "opd Learner.train_step on CPU, synthetic OPD (sampled-token) batches; selection "
                "entropy_sample keeps 50 % of the response tokens",
        "model": os.path.relpath(args.model, ROOT) if args.model.startswith(str(ROOT)) else args.model,
        "setup": {"steps_timed": steps,
                  "untimed_steps": "one 1x2 warm-up (outside the memory window), one full",
                  "torch_threads": args.threads,
                  "micro_batch_size": args.micro_batch or "whole batch", "prompt_len": PROMPT_LEN,
                  "batch_sweep": {"batch": batches, "response_len": fixed_len},
                  "response_len_sweep": {"batch": fixed_batch, "response_len": lengths},
                  "seconds": "median over timed steps",
                  "tokens_per_s": "response tokens (batch x response_len) "
                  "per second, trained or not", "memory": "see module docstring (per-config process RSS)"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "note": "shared with other concurrent work: times are noisy, compare ratios"},
        "exponents": exponents,
        "selection_vs_none": ratios,
        "configs": results,
        "wall_seconds": round(time.perf_counter() - t_all, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
