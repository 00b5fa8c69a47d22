"""Command line: ``opd run | demo | bootstrap | eval``.

    opd demo                                   # embedded default: bootstrap models, distil, evaluate
    opd run configs/demo.yaml algorithm=grpo   # any config, key=value overrides
    opd run configs/demo.yaml --resume         # continue from the newest checkpoint
    opd bootstrap --out models/demo            # build the tiny teacher/student checkpoints
    opd eval configs/demo.yaml models.student=runs/demo/checkpoints/step_000040/model

Bad input (config, data, model directories) prints one message naming the key and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from opd.config import Config, ConfigError, load_config

EXIT_BAD_INPUT = 2


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("config", nargs="?" if default else None, default=default, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--address", help="join this Ray cluster instead of starting an embedded one (sets cluster.address)")


def _config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"cluster.address={args.address}")
    return load_config(args.config, overrides)


def _print_table(summary: dict) -> None:
    rows = [
        ("teacher accuracy", summary.get("teacher_accuracy")),
        ("student accuracy before", summary.get("student_accuracy_before")),
        ("student accuracy after", summary.get("student_accuracy_after")),
        ("held-out prompts", summary.get("eval_prompts")),
        ("steps", summary.get("steps")),
        ("wall seconds", summary.get("wall_seconds")),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{'metric'.ljust(width)} | value\n{'-' * width}-+------")
    for key, value in rows:
        shown = f"{value:.1%}" if isinstance(value, float) and "accuracy" in key else ("-" if value is None else value)
        print(f"{key.ljust(width)} | {shown}")


def cmd_run(args: argparse.Namespace) -> int:
    from opd.driver import run

    summary = run(_config(args), resume=args.resume, progress=not args.no_progress)
    _print_table(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from opd.driver import run
    from opd.tasks.bootstrap import bootstrap, demo_spec

    cfg = _config(args)
    models_dir = Path(cfg.models.student).parent
    info = bootstrap(models_dir, demo_spec())
    print(f"models in {models_dir}: teacher {info.get('teacher_accuracy')}, student {info.get('student_accuracy')} held-out accuracy after SFT")
    summary = run(cfg, fresh=True, progress=not args.no_progress)
    _print_table(summary)
    print(f"\nsummary: {Path(cfg.run.output_dir) / 'summary.json'}")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from opd.tasks import bootstrap as bs

    spec = {"demo": bs.demo_spec, "tiny": bs.tiny_spec}[args.preset]()
    print(json.dumps(bs.bootstrap(Path(args.out), spec, force=args.force), indent=2, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from opd.evaluation import evaluate_models

    result = evaluate_models(_config(args), teacher=args.teacher)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation on Ray + vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a distillation job from a config")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.output_dir")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("demo", help="the embedded default: bootstrap tiny models, distil on CPU, evaluate")
    _add_config_args(p, default="configs/demo.yaml")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("bootstrap", help="build the tiny teacher and student checkpoints")
    p.add_argument("--out", default="models/demo")
    p.add_argument("--preset", choices=["demo", "tiny"], default="demo")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(fn=cmd_bootstrap)
    p = sub.add_parser("eval", help="held-out accuracy of models.student (and the teacher with --teacher)")
    _add_config_args(p)
    p.add_argument("--teacher", action="store_true", help="also evaluate models.teacher")
    p.set_defaults(fn=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"opd: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
