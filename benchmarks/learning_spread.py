"""How far each learning test of ``tests/test_learning.py`` moves its held-out signal, over training seeds and
over tiny models bootstrapped with other seeds (which stand in for the same bootstrap on another CPU: where
exact-match SFT lands moves with float rounding). Prints JSON: per run the before/after signal, the margin in
standard errors (the test passes above ``MARGIN``), and per objective the pass rate and the spread.

    python benchmarks/learning_spread.py --seeds 0-9 --boots 0-2 --out benchmarks/results/learning_spread.json
    # one objective, another rate
    python benchmarks/learning_spread.py --runs opd --lr 3e-3 --seeds 0-39 --boots 3
    # every run must then fail
    python benchmarks/learning_spread.py --flip-sign --seeds 0-2 --boots 0
    python benchmarks/learning_spread.py --runs srpo --set srpo.entropy_beta=0         # another setting

Each run is the test's own code (its world, config, plan, learner, training loop and yardsticks), ~2-6 s on 2
cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _ints(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _flip_sign() -> None:
    """Every objective's loss negated where the learner takes it: a learning test that still passes guards
    nothing."""
    from opd.trainer import learner

    token_loss = learner.token_loss

    def flipped(*args, **kwargs):
        loss_BT, count_BT = token_loss(*args, **kwargs)
        return -loss_BT, count_BT

    learner.token_loss = flipped


def one_run(T, world, name: str, seed: int, lr: float | None, extra: list[str] | None = None) -> dict:
    """One learning test's run at ``seed``: (before, after) of its signal and its margin in standard
    errors."""
    import math

    runs = {**T.KL_RUNS, **T.REWARD_RUNS, "sdpo": T.SDPO_RUN}
    overrides = [*runs[name], *([f"trainer.lr={lr}"] if lr else []), *(extra or [])]
    cfg = T.job_config(world, *overrides, seed=seed)
    learner = T.make_learner(cfg)
    if name in T.KL_RUNS:
        measure, sign = (lambda: T.heldout_kl(world, learner, world.teacher)), 1.0
    elif name in T.REWARD_RUNS:
        measure, sign = (lambda: T.heldout_reward(world, learner)), -1.0
    else:
        start, reprompt = T._teacher(world.student), T.reprompter(world)
        measure, sign = (lambda: T.heldout_kl(world, learner, start, reprompt)), 1.0
    before = measure()
    T.train(world, learner, cfg)
    after = measure()
    margin = sign * (before[0] - after[0]) / math.hypot(before[1], after[1])
    return {"run": name, "seed": seed, "lr": cfg.trainer.lr, "before": round(before[0], 4),
            "before_se": round(before[1], 4),
            "after": round(after[0], 4), "after_se": round(after[1], 4), "margin": round(margin, 2),
            "passed": margin > T.MARGIN}


def summary(rows: list[dict], margin: float) -> dict:
    out = {}
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        m = [r["margin"] for r in mine]
        out[name] = {"runs": len(mine), "passed": sum(r["passed"] for r in mine), "margin_min": min(m),
                     "margin_median": statistics.median(m),
                     "before": [min(r["before"] for r in mine), max(r["before"] for r in mine)],
                     "after": [min(r["after"] for r in mine), max(r["after"] for r in mine)],
                     "test_margin": margin}
    return out


def main() -> None:
    from emit import emit  # beside this script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="", help="comma-separated test runs (default: all eight)")
    ap.add_argument("--seeds", default="0-9", help="training seeds, e.g. 0-9 or 0,3,5")
    ap.add_argument("--boots", default="0", help="bootstrap seeds of the tiny models (0 is the test's own)")
    ap.add_argument("--lr", type=float, default=None, help="override every run's trainer.lr")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: the test's)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default: the test's)")
    ap.add_argument("--set", nargs="*", default=[], help="more key=value overrides for every run")
    ap.add_argument("--flip-sign", action="store_true", help="negate every loss: each run must then fail")
    ap.add_argument("--models", default="/tmp/opd-learning-spread",
                    help="where the bootstrapped tiny models go")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    import test_learning as T

    from opd.tasks.bootstrap import bootstrap, tiny_spec

    if args.flip_sign:
        _flip_sign()
    if args.steps:  # after each run's own overrides: these win
        args.set.append(f"trainer.total_steps={args.steps}")
    if args.prompts:
        args.set.append(f"rollout.prompts_per_step={args.prompts}")
    names = [n for n in args.runs.split(",") if n] or [*T.KL_RUNS, *T.REWARD_RUNS, "sdpo"]
    rows, t0 = [], time.perf_counter()
    for boot in _ints(args.boots):
        models = Path(args.models) / f"boot{boot}"
        bootstrap(models, dataclasses.replace(tiny_spec(), seed=boot))
        world = T.make_world(models)
        for name in names:
            for seed in _ints(args.seeds):
                row = {"boot": boot, **one_run(T, world, name, seed, args.lr, args.set)}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    result = {"command": " ".join(sys.argv), "flip_sign": args.flip_sign, "overrides": args.set,
              "group": T.GROUP, "wall_s": round(time.perf_counter() - t0), "summary": summary(rows, T.MARGIN),
              "rows": rows}
    emit(result, args.out)


if __name__ == "__main__":
    main()
