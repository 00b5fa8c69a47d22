"""Step time with the teacher served by vLLM's OpenAI-compatible server (``teacher.protocol: openai``) against
the in-cluster teacher actor, on the same job, machine and models, side by side in one run.

    python benchmarks/served_teacher.py --steps 20 --out benchmarks/results/served_teacher.json

The server (the module ``vllm serve`` runs) is started here on 127.0.0.1 with the config's teacher and stays
up for both jobs, so the in-cluster job runs beside an idle server and the served one beside the same engine
busy. On a one-machine CPU run the server shares the cores with the job's actors; on a cluster it runs on its
own GPUs. Prints JSON: per variant the median step seconds (the first step left out: engines warm up), the
teacher's scoring rate, and the ratio served / in-cluster.
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
sys.path.insert(0, str(ROOT / "tests"))

MODEL = "teacher"


def job(cfg_path: str, out: Path, steps: int, extra: list[str]) -> dict:
    from opd.config import load_config
    from opd.driver import run

    over = [f"run.output_dir={out}", f"trainer.total_steps={steps}", "eval.num_prompts=100",
            "eval.kl_samples=0", "checkpoint.every=0", *extra]
    t0 = time.perf_counter()
    summary = run(load_config(cfg_path, over), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    scoring = statistics.median(r.get("score_tokens_per_s", 0) for r in later)
    return {"wall_s": round(time.perf_counter() - t0, 1), "steps": summary["steps"],
            "median_step_s": round(statistics.median(r["step_seconds"] for r in later), 3),
            "median_score_tokens_per_s": round(scoring), "teacher_kl_last": later[-1]["teacher_kl"],
            "student_accuracy_after": summary["student_accuracy_after"]}


def main() -> None:
    from emit import emit  # beside this script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    import ray
    from servers import free_port, start_vllm_server, stop_group

    from opd.config import load_config
    from opd.rollout.engine import ACTOR_ENV

    cfg = load_config(args.config)
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": ACTOR_ENV},
             log_to_driver=False)
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        server = start_vllm_server(Path(cfg.models.teacher), port, Path(d) / "serve.log", MODEL, None,
                                   cfg.rollout.max_model_len)
        try:
            local = job(args.config, Path(d) / "local", args.steps, [])
            served = job(args.config, Path(d) / "served", args.steps, [
                f"teacher.url=http://127.0.0.1:{port}", "teacher.protocol=openai", f"teacher.model={MODEL}"])
        finally:
            stop_group(server)
    result = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}",
              "config": args.config, "in_cluster": local, "served": served,
              "step_time_ratio_served_over_in_cluster":
                  round(served["median_step_s"] / local["median_step_s"], 2)}
    emit(result, args.out)


if __name__ == "__main__":
    main()
