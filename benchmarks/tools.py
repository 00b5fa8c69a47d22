"""The tool task: a student that answers ``a*b+c=`` in its head, distilled on-policy with the ``calc`` tool
(multi-turn episodes, ``configs/tools.yaml``) and, side by side, the same student distilled on answers alone
(``agent.environment=null``: one prompt -> one completion, the same teacher scoring it).

    python benchmarks/tools.py --seeds 0 1 --out benchmarks/results/tools.json

Builds ``--models`` with ``opd bootstrap --preset tools`` when it is not there. Each seed is a run seed and a
row set (``task.seed``: other training and held-out rows than the pair was built and checked on). Prints
JSON: per arm and seed the held-out accuracy, tool-call rate, turns, tool errors and drift rate of greedy
episodes before and after, the teacher's, and the gains' mean and spread.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {"episodes": [], "answers": ["agent.environment=null", "rollout.max_new_tokens=8",
                                    "eval.max_new_tokens=8"]}


def job(models: Path, out: Path, seed: int, steps: int, extra: list[str]) -> dict:
    from opd.config import load_config
    from opd.driver import run

    over = [f"models.student={models / 'student'}", f"models.teacher={models / 'teacher'}",
            f"run.output_dir={out}", f"run.seed={seed}", f"task.seed={seed}", f"trainer.total_steps={steps}",
            "checkpoint.every=0", "eval.every=0", *extra]
    t0 = time.perf_counter()
    s = run(load_config(str(ROOT / "configs/tools.yaml"), over), progress=False)
    before, after = s.get("student_episodes_before", {}), s.get("student_episodes_after", {})
    return {"accuracy_before": s["student_accuracy_before"], "accuracy_after": s["student_accuracy_after"],
            "gain": round(s["student_accuracy_after"] - s["student_accuracy_before"], 4),
            "teacher_accuracy": s["teacher_accuracy"], "teacher_episodes": s.get("teacher_episodes", {}),
            "episodes_before": before, "episodes_after": after,
            "teacher_kl_before": s["teacher_kl_before"], "teacher_kl_after": s["teacher_kl_after"],
            "eval_prompts": s["eval_prompts"], "steps": s["steps"],
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    from emit import emit  # beside this script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="models/tools")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides for every job")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    from opd.agents.tool_bootstrap import bootstrap_tools

    models = Path(args.models)
    boot = bootstrap_tools(models)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="opd-tools-") as tmp:
        for arm in args.arms:
            runs[arm] = {str(seed): job(models, Path(tmp) / f"{arm}-{seed}", seed, args.steps,
                                        ARMS[arm] + args.set) for seed in args.seeds}
    gains = {arm: [r["gain"] for r in rs.values()] for arm, rs in runs.items()}
    emit({"machine": f"{platform.node()} {platform.machine()}", "steps": args.steps, "seeds": args.seeds,
          "overrides": args.set,
          "bootstrap": {r: {k: boot[r][k] for k in ("params", "accuracy", "tool_call_rate", "turns", "steps")}
                        for r in ("teacher", "student")},
          "runs": runs,
          "gain_mean": {a: round(statistics.mean(g), 4) for a, g in gains.items()},
          "gain_spread": {a: round(max(g) - min(g), 4) for a, g in gains.items()}}, args.out)


if __name__ == "__main__":
    main()
