"""How long a user waits for a config error: each bad invocation run as a user runs it (a fresh ``opd``
process), timed to its exit, beside ``opd --help`` (the interpreter and the CLI's own imports) on the same
machine.

    python benchmarks/config_errors.py --repeats 5 --out benchmarks/results/config_errors.json

Prints JSON: per case the median and worst seconds to the exit, the exit code, whether the message names the
key, and the ratio to ``opd --help``. Every case must exit 2; none starts Ray or imports torch
(tests/test_late_inputs.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPD = [sys.executable, "-m", "opd.cli"]


def cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty.yaml").write_text("")
    for role in ("student", "teacher"):  # checkpoints as far as the file checks look (weights load later)
        (tmp / role).mkdir()
        (tmp / role / "config.json").write_text("{}")
    models = [f"models.student={tmp / 'student'}", f"models.teacher={tmp / 'teacher'}"]
    return {
        "unknown key": (["run", "configs/demo.yaml", "foo.bar=1"], "unknown config key"),
        "bad value": (["run", "configs/demo.yaml", "trainer.lr=-1"], "trainer.lr"),
        "missing model": (["run", "configs/demo.yaml", "models.student=/no/such/dir"], "models.student"),
        "empty config file": (["run", str(tmp / "empty.yaml")], "is empty"),
        "resume without a run": (["run", "configs/demo.yaml", *models, f"run.output_dir={tmp / 'none'}",
                                  "--resume"],
                                 "--resume given"),
        "submit, bad value": (["submit", "configs/demo.yaml", "rollout.group_size=0", "--address",
                               "http://127.0.0.1:1"],
                              "rollout.group_size"),
        "eval, missing model": (["eval", "configs/demo.yaml", "models.student=/no/such/dir"],
                                "models.student"),
    }


def timed(argv: list[str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - t0, out.returncode, out.stderr


def main() -> None:
    from emit import emit  # beside this script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        timed([*OPD, "--help"])  # the first start fills the bytecode caches; every case after starts warm
        help_s = statistics.median(timed([*OPD, "--help"])[0] for _ in range(args.repeats))
        rows = {}
        for name, (argv, needle) in cases(tmp).items():
            runs = [timed([*OPD, *argv]) for _ in range(args.repeats)]
            seconds = [s for s, _, _ in runs]
            rows[name] = {"argv": argv, "median_s": round(statistics.median(seconds), 3),
                          "max_s": round(max(seconds), 3),
                          "exit_code": runs[0][1], "names_the_key": needle in runs[0][2],
                          "ratio_to_help": round(statistics.median(seconds) / help_s, 2)}
    result = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
              f"{__import__('os').cpu_count()} cores", "help_median_s": round(help_s, 3), "cases": rows,
              "worst_s": max(r["max_s"] for r in rows.values()),
              "all_exit_2": all(r["exit_code"] == 2 for r in rows.values()),
              "all_name_the_key": all(r["names_the_key"] for r in rows.values())}
    emit(result, args.out)


if __name__ == "__main__":
    main()
