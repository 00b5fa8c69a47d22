"""A teacher of another model family: Gemma 3 270M (base, 262k SentencePiece vocabulary, opd's plain
template) distilling SmolLM2-tokenizer students (49,152-token byte-level BPE, ChatML) by sampled-token OPD on
byte-aligned chunks (``teacher.tokenizer: auto`` finds the vocabularies differ), on the word-problem task of
``configs/smollm2.yaml``; beside it, the same students under same-tokenizer OPD from SmolLM2-135M-Instruct,
for the seconds a step costs.

    opd bootstrap --model smollm2 --out models/smollm2
    opd bootstrap --model gemma3-270m --out models/gemma3-270m
    opd prune models/smollm2 --keep-layers 0,29 --out models/smollm2-L2
    opd prune models/smollm2 --keep-layers every:3 --out models/smollm2-L10
    python benchmarks/cross_tokenizer.py --students models/smollm2-L2 models/smollm2-L10 --seeds 0 1 \\
        --out benchmarks/results/cross_tokenizer.json

Each seed is a run seed and a row set (``task.seed``). Prints JSON: per student and seed the held-out aligned
KL(student || teacher) per student token before and after (the mean over ``eval.kl_samples`` samples of each
held-out prompt of the chunk log-ratios), its relative drop, held-out accuracies, the chunk metrics and the
median seconds per step; per student the same-tokenizer arm's median seconds per step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CROSS = ("cross_one_to_one", "cross_chunk_tokens", "cross_scored_fraction", "cross_teacher_tokens_per_token")


def job(student: Path, teacher: Path, out: Path, seed: int, steps: int, extra: list[str]) -> dict:
    from opd.config import load_config
    from opd.driver import run

    over = [f"models.student={student}", f"models.teacher={teacher}", f"run.output_dir={out}",
            f"run.seed={seed}", f"task.seed={seed}", f"trainer.total_steps={steps}", "opd.divergence=sampled",
            "teacher.top_k=0", "checkpoint.every=0", *extra]
    t0 = time.perf_counter()
    s = run(load_config(str(ROOT / "configs/smollm2.yaml"), over), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["step_seconds"] for r in rows[1:]]  # the first step also warms the engines up
    result = {"step_seconds_median": round(statistics.median(seconds), 2),
              "score_seconds_median": round(statistics.median(r["score_seconds"] for r in rows[1:]), 2),
              "wall_s": round(time.perf_counter() - t0, 1), "steps": s["steps"]}
    if s["teacher_kl_before"] is not None:
        before, after = s["teacher_kl_before"], s["teacher_kl_after"]
        result.update({"heldout_kl_before": round(before, 3),
                       "heldout_kl_after": None if after is None else round(after, 3),
                       "heldout_kl_drop": None if after is None else round(1 - after / before, 3),
                       "heldout_scored_fraction_after": s.get("cross_scored_fraction_after"),
                       "accuracy_before": s["student_accuracy_before"],
                       "accuracy_after": s["student_accuracy_after"],
                       "teacher_accuracy": s["teacher_accuracy"],
                       "train_kl_first": rows[0].get("teacher_kl"),
                       "train_kl_last": rows[-1].get("teacher_kl")})
    if "cross_one_to_one" in rows[0]:
        result["chunks"] = {k: round(statistics.mean(r[k] for r in rows), 3) for k in CROSS}
    return result


def main() -> None:
    from emit import emit  # beside this script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="models/gemma3-270m", help="the other family's teacher")
    ap.add_argument("--same-teacher", default="models/smollm2", help="the students' own family's teacher")
    ap.add_argument("--students", nargs="+", default=["models/smollm2-L2", "models/smollm2-L10"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timing-steps", type=int, default=8, help="steps of the same-tokenizer timing arm")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides for every job")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    extra = ["eval.num_prompts=40", "eval.kl_samples=2", *args.set]
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="opd-cross-") as tmp:
        for student in map(Path, args.students):
            cross = {str(seed): job(student, Path(args.teacher), Path(tmp) / f"{student.name}-{seed}", seed,
                                    args.steps, extra) for seed in args.seeds}
            same = job(student, Path(args.same_teacher), Path(tmp) / f"{student.name}-same", args.seeds[0],
                       args.timing_steps, [*args.set, "eval.kl_samples=0", "eval.num_prompts=10"])
            drops = [r["heldout_kl_drop"] or 0.0 for r in cross.values()]  # nothing scored: no drop
            runs[student.name] = {
                "cross": cross, "same_tokenizer": same,
                "heldout_kl_drop_mean": round(statistics.mean(drops), 3),
                "heldout_kl_drop_spread": round(max(drops) - min(drops), 3),
                "step_seconds_cross_over_same": round(
                    statistics.median(r["step_seconds_median"] for r in cross.values())
                    / same["step_seconds_median"], 2)}
    emit({"machine": f"{platform.node()} {platform.machine()}", "teacher": args.teacher,
          "same_teacher": args.same_teacher, "steps": args.steps, "seeds": args.seeds, "overrides": extra,
          "runs": runs}, args.out)


if __name__ == "__main__":
    main()
