"""Every objective with the same budget, side by side: on the embedded task (``--pair demo``, the tiny
character models) or on a real one (``--pair smollm2``: SmolLM2-135M-Instruct teaching "What is a + b?" to
27-of-30-layer copies of itself, ``configs/smollm2.yaml``; the students are pruned here when missing).

    python benchmarks/algorithms.py --out runs/bench-algorithms   # default budget (<= 60 min on 2 cores)
    python benchmarks/algorithms.py --pair smollm2 --out runs/bench-smollm2
    python benchmarks/algorithms.py --out /tmp/b --steps 4 --seeds 1 --objectives opd grpo   # smoke

Writes DIR/algorithms.json (per objective: held-out accuracy and KL(student || teacher) per evaluated step,
final accuracy, steps to reach half and 90 % of the teacher's accuracy, peak learner activation memory, tokens
trained, seconds per step; per seed and averaged), DIR/algorithms.md (a table) and DIR/algorithms.png
(accuracy and KL vs step). Prints the JSON summary. On the smollm2 pair each seed is also its own student and
row set (``task.seed``). Each finished run is kept as RUN_DIR/result.json and the report is rewritten after
every objective; ``--reuse`` picks an interrupted invocation up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Pair:
    """A teacher, its students and the budget every objective shares on them."""

    config: str
    # Every objective the same steps, prompts and samples. Groups of 4, because GRPO, SDPO, SRPO, PACED and
    # opd_reward learn from the spread of rewards inside a group.
    budget: dict
    lr: dict  # family -> learning rate (``OBJECTIVES``' second field)
    steps: int
    eval_every: int
    eval_prompts: int
    # run i: student i % len, row set (task.seed) i and run seed i; None keeps the config's student
    students: tuple = (None,)
    # student path -> the teacher's layers it keeps (``opd prune``); built when missing
    pruned: dict = field(default_factory=dict)
    rows_per_seed: bool = False
    note: str = ""


# student path -> the layers of SmolLM2-135M-Instruct it keeps
SMOLLM2_STUDENTS = {"models/smollm2-L27a": "0-14,18-29", "models/smollm2-L27b": "0-16,20-29"}

PAIRS = {
    # Two learning rates, each the highest measured stable for its family on these models: objectives that
    # push on the sampled tokens only (policy gradient: GRPO, sampled-token OPD/ExOPD, SDPO/SRPO) collapse at
    # 2e-3 (GRPO went 11 % -> 0 % in 40 steps) and learn at 3e-4; a dense target over the teacher's top-k is
    # stable at 3e-3.
    "demo": Pair("configs/demo.yaml", {"rollout.prompts_per_step": 64, "rollout.group_size": 4,
                                       "trainer.warmup_steps": 20},
                 {"pg": 3e-4, "dense": 3e-3}, steps=150, eval_every=25, eval_prompts=200,
                 note="Objectives on the embedded arithmetic task"),
    # 16 samples a step as configs/smollm2.yaml, in groups of 4. The learning rate is the config's 1e-4 for
    # both families, the highest that held in a one-seed sweep (``--lr``, seed 0): at 3e-4 top-k OPD's
    # held-out KL fell less (0.69 -> 0.43 against 0.32) and sampled-token OPD's rose (-> 0.86). The
    # students keep 27 of the 30 layers: greedily they answer 5-10 % of the held-out questions (the teacher
    # 43 %), sampled at temperature 1 about 2 %, so GRPO gets a reward in about one step in four. Students
    # with 20 or 24 layers answer 0-1 % (written as a number, ``math_answer``'s ``number_only``): next to no
    # reward for GRPO, SRPO, PACED or opd_reward to learn from.
    "smollm2": Pair("configs/smollm2.yaml", {"rollout.prompts_per_step": 4, "rollout.group_size": 4,
                                             "trainer.warmup_steps": 2, "eval.kl_samples": 1,
                                             "eval.teacher": True},
                    {"pg": 1e-4, "dense": 1e-4}, steps=20, eval_every=5, eval_prompts=100,
                    students=tuple(SMOLLM2_STUDENTS), pruned=SMOLLM2_STUDENTS, rows_per_seed=True,
                    note="Objectives on SmolLM2-135M-Instruct -> 27-layer students, a + b"),
}

# name -> (overrides, learning-rate family). "opd" is the configs' estimator (teacher top-k forward KL);
# "opd-sampled" is the sampled-token one, which ExOPD extrapolates and TIP ranks tokens by, so those
# comparisons are like for like.
OBJECTIVES = {
    "grpo": ({"algorithm": "grpo"}, "pg"),
    "opd": ({"algorithm": "opd", "opd.divergence": "teacher_topk"}, "dense"),
    "opd-sampled": ({"algorithm": "opd", "opd.divergence": "sampled"}, "pg"),
    "exopd": ({"algorithm": "exopd"}, "pg"),
    "sdpo": ({"algorithm": "sdpo"}, "pg"),
    "srpo": ({"algorithm": "srpo"}, "pg"),
    # opd_reward's KL term is the sampled token's (the config refuses it with teacher_topk)
    "opd_reward": ({"algorithm": "opd_reward", "opd.divergence": "sampled"}, "pg"),
    # TIP's headline setting: entropy-weighted sampling of 50 % of the tokens (the Q3 "overconfident" quadrant
    # keeps ~3 % of the tokens on this task, far below the ratio).
    "opd-sampled+tip50": ({"algorithm": "opd", "opd.divergence": "sampled",
                           "selection.mode": "entropy_sample", "selection.keep_ratio": 0.5}, "pg"),
    # PACED zeroes every group whose samples all agree, so few groups carry signal: the sparse-signal rate. At
    # the dense rate (3e-3) it collapsed to 0 % on both seeds within 30 steps on the demo pair.
    "opd+paced": ({"algorithm": "opd", "weighting.paced": True}, "pg"),
}
DEMO_OBJECTIVES = [n for n in OBJECTIVES if n != "opd_reward"]  # the committed toy table's set


def lr_of(pair: Pair, name: str, override: float | None = None) -> float:
    return override if override is not None else pair.lr[OBJECTIVES[name][1]]


def _runs(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name.replace('+', '_')}-s{seed}"


def config_of(pair: Pair, name: str, seed: int, args):
    """The job config of objective ``name``'s run ``seed``: the pair's config with the shared budget."""
    from opd.config import load_config

    run_dir = _runs(args.out, name, seed)
    student = pair.students[seed % len(pair.students)]
    overrides = {
        **pair.budget,
        **OBJECTIVES[name][0],
        "trainer.lr": lr_of(pair, name, args.lr),
        **({"models.student": student} if student else {}),
        **({"task.seed": seed} if pair.rows_per_seed else {}),
        "run.name": run_dir.name, "run.output_dir": str(run_dir), "run.seed": seed,
        "trainer.total_steps": args.steps, "eval.every": args.eval_every,
        "eval.num_prompts": args.eval_prompts,
        "checkpoint.every": 0, "checkpoint.keep": 1,
        "run.log_samples": True,  # what each step trained on, to read a curve's turns from
    }
    return load_config(ROOT / pair.config, [f"{k}={v}" for k, v in overrides.items()])


def run_one(pair: Pair, name: str, seed: int, args) -> dict:
    from opd.driver import run

    cfg = config_of(pair, name, seed, args)
    run_dir = Path(cfg.run.output_dir)
    t0 = time.perf_counter()
    summary = run(cfg, fresh=True, progress=False)
    # The benchmark reads metrics, not weights: a SmolLM2 run's final checkpoint is 1.4 GB, and a sweep's
    # would fill the disk.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("eval_accuracy") is not None]
    curve = [(0, summary["student_accuracy_before"])] + [(r["step"] + 1, r["eval_accuracy"]) for r in evals]
    kl_curve = [(0, summary["teacher_kl_before"])] + [(r["step"] + 1, r.get("eval_teacher_kl"))
                                                      for r in evals]
    if any(r.get("eval_accuracy") is None for r in rows if (r["step"] + 1) % args.eval_every == 0):
        raise RuntimeError(f"{name} seed {seed}: an evaluation is missing from {run_dir / 'metrics.jsonl'}")
    return {
        "seed": seed,
        "student": cfg.models.student,
        "curve": curve,
        "kl_curve": kl_curve,
        "final_accuracy": summary["student_accuracy_after"],
        "teacher_accuracy": summary["teacher_accuracy"],
        "peak_activation_mib": max((r.get("activation_mib") or 0.0) for r in rows),
        "tokens_trained": sum((r.get("train_tokens") or 0.0) for r in rows),
        # steps without a held-out evaluation in them
        "seconds_per_step": round(statistics.median(
            r["step_seconds"] for r in rows if r.get("eval_accuracy") is None), 2),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def half_gap(start: float, teacher: float) -> float:
    """The accuracy halfway from the student's start to the teacher: a target every objective can meet in
    budget."""
    return start + 0.5 * (teacher - start)


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc is not None and acc >= target), None)


def _mean_curve(seeds: list[dict], key: str) -> list[tuple[int, float | None]]:
    steps = [p[0] for p in seeds[0][key]]
    return [(s, None if any(r[key][i][1] is None for r in seeds)
             else statistics.fmean(r[key][i][1] for r in seeds)) for i, s in enumerate(steps)]


def summarise(results: dict[str, list[dict]], teacher: float) -> dict:
    out = {}
    for name, seeds in results.items():
        mean_curve, kl_curve = _mean_curve(seeds, "curve"), _mean_curve(seeds, "kl_curve")
        out[name] = {
            "accuracy_per_step": mean_curve,
            "teacher_kl_per_step": kl_curve,
            "final_accuracy": statistics.fmean(r["final_accuracy"] for r in seeds),
            "final_accuracy_per_seed": [r["final_accuracy"] for r in seeds],
            "final_teacher_kl": kl_curve[-1][1],
            "final_teacher_kl_per_seed": [r["kl_curve"][-1][1] for r in seeds],
            "steps_to_half_teacher": steps_to(mean_curve, 0.5 * teacher),
            "steps_to_90pct_teacher": steps_to(mean_curve, 0.9 * teacher),
            "steps_to_half_gap": steps_to(mean_curve, half_gap(mean_curve[0][1], teacher)),
            "peak_activation_mib": max(r["peak_activation_mib"] for r in seeds),
            "tokens_trained": statistics.fmean(r["tokens_trained"] for r in seeds),
            "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in seeds),
            "seconds_per_run": statistics.fmean(r["seconds"] for r in seeds),
            "seeds": [r["seed"] for r in seeds],
        }
    return out


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def write_report(out: Path, summary: dict, teacher: float, meta: dict) -> None:
    runs = ", ".join(f"seed {i}: {s}" for i, s in enumerate(meta["students"])) if meta["students"] else ""
    lines = [
        f"Teacher held-out accuracy: {teacher:.1%}. Budget per run: {meta['steps']} steps x "
        f"{meta['prompts_per_step']} prompts x {meta['group_size']} samples; AdamW, lr per objective; "
        f"{meta['seeds']} seed(s){' (' + runs + ', each seed its own row set)' if runs else ''}; "
        f"greedy accuracy and KL(student || teacher) on {meta['eval_prompts']} held-out prompts.",
        "",
        "| objective | lr | final accuracy (per seed) | held-out KL, start → end (per seed) "
        "| steps to half the teacher | steps to 90% of teacher | steps to half the gap "
        "| tokens trained | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        half, reach, gap = (s[k] if s[k] is not None else "not reached"
                            for k in ("steps_to_half_teacher", "steps_to_90pct_teacher", "steps_to_half_gap"))
        seeds = ", ".join(f"{a:.1%}" for a in s["final_accuracy_per_seed"])
        kls = ", ".join(_fmt(a, ".2f") for a in s["final_teacher_kl_per_seed"])
        lines.append(
            f"| {name} | {meta['lr'][name]:g} | {s['final_accuracy']:.1%} ({seeds}) | "
            f"{_fmt(s['teacher_kl_per_step'][0][1], '.2f')} → {_fmt(s['final_teacher_kl'], '.2f')} ({kls}) | "
            f"{half} | {reach} | {gap} | {s['tokens_trained']:.0f} | {s['seconds_per_step']:.2f} |"
        )
    (out / "algorithms.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_kl = any(v is not None for s in summary.values() for _, v in s["teacher_kl_per_step"])
    fig, axes = plt.subplots(1, 2 if has_kl else 1, figsize=(12 if has_kl else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    # one colour per objective in both panels (the KL panel leaves out the teacher-free ones)
    colour = {name: f"C{i}" for i, name in enumerate(summary)}
    for name, s in summary.items():
        xs, ys = zip(*s["accuracy_per_step"], strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=name, color=colour[name])
    ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{meta['note']} (mean over seeds)", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    if has_kl:
        ax = axes[0][1]
        for name, s in summary.items():
            pts = [(x, y) for x, y in s["teacher_kl_per_step"] if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=name, color=colour[name])
        ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out KL(student || teacher), nats/token")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "algorithms.png", dpi=120)


def _teacher_of(results: dict[str, list[dict]]) -> float | None:
    """The teacher's accuracy on the row sets, averaged over seeds (every objective sees the same ones)."""
    teachers = {r["seed"]: r["teacher_accuracy"] for rs in results.values() for r in rs
                if r["teacher_accuracy"] is not None}
    return statistics.fmean(teachers.values()) if teachers else None


def report(args, pair: Pair, names: list[str], results: dict[str, list[dict]], base) -> dict:
    """Write ``algorithms.{json,md,png}`` for the runs in ``results``; return the JSON's content."""
    teacher = _teacher_of(results)
    if teacher is None:  # only teacher-free objectives ran
        from opd.evaluation import evaluate_models

        teacher = evaluate_models(base, teacher=True)["teacher_accuracy"]
    summary = summarise(results, teacher)
    meta = {"pair": args.pair, "config": pair.config, "note": pair.note, "steps": args.steps,
            "seeds": args.seeds, "eval_prompts": args.eval_prompts,
            "students": [pair.students[i % len(pair.students)] for i in range(args.seeds)]
            if pair.students[0] else [],
            "prompts_per_step": pair.budget["rollout.prompts_per_step"],
            "group_size": pair.budget["rollout.group_size"],
            "lr": {name: lr_of(pair, name, args.lr) for name in names if name in results}}
    out = {"teacher_accuracy": teacher, "budget": meta, "objectives": summary, "runs": results}
    (args.out / "algorithms.json").write_text(json.dumps(out, indent=2) + "\n")
    write_report(args.out, summary, teacher, meta)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pair", choices=list(PAIRS), default="demo")
    p.add_argument("--steps", type=int, help="default: the pair's budget")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-prompts", type=int)
    p.add_argument("--lr", type=float, help="one learning rate for every objective (a sweep's point)")
    p.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES))
    p.add_argument("--reuse", action="store_true",
                   help="keep the runs a previous invocation with the same --out finished")
    args = p.parse_args()
    pair = PAIRS[args.pair]
    args.steps = args.steps or pair.steps
    args.eval_every = args.eval_every or pair.eval_every
    args.eval_prompts = args.eval_prompts or pair.eval_prompts
    names = args.objectives or (DEMO_OBJECTIVES if args.pair == "demo" else list(OBJECTIVES))
    args.out.mkdir(parents=True, exist_ok=True)

    from opd.config import load_config

    base = load_config(ROOT / pair.config)
    if args.pair == "demo":
        from opd.tasks.bootstrap import bootstrap, demo_spec

        bootstrap(Path(base.models.student).parent, demo_spec())
    else:
        if not (ROOT / base.models.teacher).exists():
            sys.exit(f"algorithms.py: missing {base.models.teacher}: build it first (README, 'A real model')")
        from opd.models.prune import prune

        for student, layers in pair.pruned.items():
            prune(ROOT / base.models.teacher, layers, ROOT / student)
    results: dict[str, list[dict]] = {}
    for name in names:
        for seed in range(args.seeds):
            done = _runs(args.out, name, seed) / "result.json"
            if args.reuse and done.exists():  # a run an interrupted invocation finished
                r = json.loads(done.read_text())
            else:
                r = run_one(pair, name, seed, args)
                done.write_text(json.dumps(r) + "\n")
            results.setdefault(name, []).append(r)
            print(json.dumps({"objective": name, "seed": seed, "final_accuracy": r["final_accuracy"],
                              "final_kl": r["kl_curve"][-1][1], "s_per_step": r["seconds_per_step"],
                              "seconds": r["seconds"]}), flush=True)
        if _teacher_of(results) is not None:  # the report so far: a long sweep is readable while it runs
            report(args, pair, names, results, base)
    final = report(args, pair, names, results, base)
    shown = ("final_accuracy", "final_teacher_kl", "steps_to_half_teacher", "steps_to_90pct_teacher",
             "tokens_trained", "seconds_per_step")
    print(json.dumps({"teacher_accuracy": final["teacher_accuracy"],
                      "objectives": {k: {kk: v[kk] for kk in shown} for k, v in final["objectives"].items()}},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
