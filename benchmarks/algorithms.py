"""Every objective on the embedded task with the same budget, side by side.

    python benchmarks/algorithms.py --out runs/bench-algorithms            # default budget (<= 60 min on 2 cores)
    python benchmarks/algorithms.py --out /tmp/b --steps 4 --seeds 1 --objectives opd grpo   # smoke

Writes DIR/algorithms.json (per objective: held-out accuracy per evaluated step, final accuracy, steps to reach 90 %
of the teacher's accuracy, peak learner activation memory, tokens trained; per seed and averaged),
DIR/algorithms.md (a table) and DIR/algorithms.png (accuracy vs step). Prints the JSON summary.
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

# name -> config overrides on top of configs/demo.yaml; every objective gets the same steps, prompts and samples.
OBJECTIVES = {
    "grpo": {"algorithm": "grpo"},
    "opd": {"algorithm": "opd"},
    "exopd": {"algorithm": "exopd"},
    "sdpo": {"algorithm": "sdpo"},
    "srpo": {"algorithm": "srpo"},
    "opd+tip50": {"algorithm": "opd", "selection.mode": "overconfident", "selection.keep_ratio": 0.5},
    "opd+paced": {"algorithm": "opd", "weighting.paced": True},
}


def _runs(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name.replace('+', '_')}-s{seed}"


def run_one(name: str, seed: int, args) -> dict:
    from opd.config import load_config
    from opd.driver import run

    run_dir = _runs(args.out, name, seed)
    overrides = {
        **OBJECTIVES[name],
        "run.name": run_dir.name, "run.output_dir": str(run_dir), "run.seed": seed,
        "trainer.total_steps": args.steps, "eval.every": args.eval_every, "eval.num_prompts": args.eval_prompts,
        "checkpoint.every": 0, "checkpoint.keep": 1,
    }
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"{k}={v}" for k, v in overrides.items()])
    t0 = time.perf_counter()
    summary = run(cfg, fresh=True, progress=False)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(0, summary["student_accuracy_before"])] + [(r["step"] + 1, r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    return {
        "seed": seed,
        "curve": curve,
        "final_accuracy": summary["student_accuracy_after"],
        "teacher_accuracy": summary["teacher_accuracy"],
        "peak_activation_mib": max((r.get("activation_mib") or 0.0) for r in rows),
        "tokens_trained": sum((r.get("train_tokens") or 0.0) for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc is not None and acc >= target), None)


def summarise(results: dict[str, list[dict]], teacher: float) -> dict:
    out = {}
    for name, seeds in results.items():
        steps = [p[0] for p in seeds[0]["curve"]]
        mean_curve = [(s, statistics.fmean(r["curve"][i][1] for r in seeds)) for i, s in enumerate(steps)]
        out[name] = {
            "accuracy_per_step": mean_curve,
            "final_accuracy": statistics.fmean(r["final_accuracy"] for r in seeds),
            "final_accuracy_per_seed": [r["final_accuracy"] for r in seeds],
            "steps_to_90pct_teacher": steps_to(mean_curve, 0.9 * teacher),
            "peak_activation_mib": max(r["peak_activation_mib"] for r in seeds),
            "tokens_trained": statistics.fmean(r["tokens_trained"] for r in seeds),
            "seconds_per_run": statistics.fmean(r["seconds"] for r in seeds),
            "seeds": [r["seed"] for r in seeds],
        }
    return out


def write_report(out: Path, summary: dict, teacher: float, meta: dict) -> None:
    lines = [
        f"Teacher held-out accuracy: {teacher:.1%}. Budget per run: {meta['steps']} steps x {meta['prompts_per_step']} prompts x "
        f"{meta['group_size']} samples; {meta['seeds']} seed(s); accuracy on {meta['eval_prompts']} held-out prompts (greedy).",
        "",
        "| objective | final accuracy | steps to 90% of teacher | peak learner activations (MiB) | tokens trained | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        reach = s["steps_to_90pct_teacher"]
        lines.append(
            f"| {name} | {s['final_accuracy']:.1%} | {reach if reach is not None else 'not reached'} | "
            f"{s['peak_activation_mib']:.2f} | {s['tokens_trained']:.0f} | {s['seconds_per_run']:.0f} |"
        )
    (out / "algorithms.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, s in summary.items():
        xs, ys = zip(*s["accuracy_per_step"], strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Objectives on the embedded arithmetic task (mean over seeds)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "algorithms.png", dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from opd.config import load_config
    from opd.tasks.bootstrap import bootstrap, demo_spec

    demo = load_config(ROOT / "configs" / "demo.yaml")
    bootstrap(Path(demo.models.student).parent, demo_spec())
    results: dict[str, list[dict]] = {}
    teacher = None
    for name in args.objectives:
        for seed in range(args.seeds):
            r = run_one(name, seed, args)
            teacher = teacher if teacher is not None else r["teacher_accuracy"]
            results.setdefault(name, []).append(r)
            print(json.dumps({"objective": name, "seed": seed, "final_accuracy": r["final_accuracy"], "seconds": r["seconds"]}), flush=True)
    if teacher is None:  # only teacher-free objectives ran
        from opd.evaluation import evaluate_models

        teacher = evaluate_models(demo, teacher=True)["teacher_accuracy"]
    summary = summarise(results, teacher)
    meta = {"steps": args.steps, "seeds": args.seeds, "eval_prompts": args.eval_prompts,
            "prompts_per_step": demo.rollout.prompts_per_step, "group_size": demo.rollout.group_size}
    report = {"teacher_accuracy": teacher, "budget": meta, "objectives": summary, "runs": results}
    (args.out / "algorithms.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report(args.out, summary, teacher, meta)
    print(json.dumps({"teacher_accuracy": teacher, "objectives": {k: {kk: v[kk] for kk in ("final_accuracy", "steps_to_90pct_teacher", "peak_activation_mib", "tokens_trained")} for k, v in summary.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
