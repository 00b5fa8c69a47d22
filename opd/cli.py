"""Command line: ``opd run | demo | bootstrap | prune | eval | report | serve-teacher | submit | status | logs
| stop``.

    opd demo                                   # embedded default: bootstrap models, distil, evaluate
    opd run configs/demo.yaml algorithm=grpo   # any config, key=value overrides
    opd run configs/demo.yaml --resume         # continue from the newest checkpoint
    opd bootstrap --out models/demo            # build the tiny teacher/student checkpoints
    opd bootstrap --model smollm2              # SmolLM2-135M-Instruct from its GGUF package -> models/smollm2
    opd prune models/smollm2 --keep-layers every:3 --out models/smollm2-L10   # a depth-pruned student
    opd eval configs/demo.yaml models.student=runs/demo/checkpoints/step_000300/model
    opd report runs/demo                       # PNG curves + report.md from metrics.jsonl and summary.json
    opd serve-teacher models/demo/teacher --port 8000            # teacher scoring server (docs/service.md)
    opd submit configs/demo.yaml --address http://127.0.0.1:8265 # a run as a Ray job; then status/logs/stop

Bad input (config, data, model directories) prints one message naming the key and exits with code 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import sys
from pathlib import Path

from opd.config import Config, ConfigError, load_config
from opd.errors import TeacherServerError
from opd.models.gguf import MODELS
from opd.models.hub import is_hub_id, resolve, resolve_models

EXIT_BAD_INPUT = 2
EXIT_JOB_FAILED = 1


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("config", nargs="?" if default else None, default=default, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--address",
                   help="join this Ray cluster instead of starting an embedded one (sets cluster.address)")


def _config(args: argparse.Namespace) -> Config:
    """The config with its overrides, every hub id among its models resolved to a local snapshot
    (``opd.models.hub``)."""
    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"cluster.address={args.address}")
    return resolve_models(load_config(args.config, overrides))[0]


def _print_table(summary: dict) -> None:
    rows = [
        ("teacher accuracy", summary.get("teacher_accuracy")),
        ("student accuracy before", summary.get("student_accuracy_before")),
        ("student accuracy after", summary.get("student_accuracy_after")),
        ("held-out teacher KL before", summary.get("teacher_kl_before")),
        ("held-out teacher KL after", summary.get("teacher_kl_after")),
        *((label, summary[key]["tool_call_rate"])  # agent jobs
          for label, key in (("teacher tool-call rate", "teacher_episodes"),
                             ("student tool-call rate before", "student_episodes_before"),
                             ("student tool-call rate after", "student_episodes_after")) if summary.get(key)),
        ("held-out prompts", summary.get("eval_prompts")),
        ("steps", summary.get("steps")),
        ("wall seconds", summary.get("wall_seconds")),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{'metric'.ljust(width)} | value\n{'-' * width}-+------")
    for key, value in rows:
        shown = (f"{value:.1%}" if isinstance(value, float) and ("accuracy" in key or "rate" in key)
                 else ("-" if value is None else value))
        shown = f"{value:.3f} nats/token" if isinstance(value, float) and "KL" in key else shown
        print(f"{key.ljust(width)} | {shown}")


def _check_job(cfg: Config, args: argparse.Namespace) -> None:
    """The config's files and run directory, before torch, Ray or vLLM are imported: a mistake costs a
    second."""
    from opd.preflight import check_job

    check_job(cfg, resume=args.resume, fresh=getattr(args, "fresh", False),
              change_objective=args.change_objective)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _check_job(cfg, args)
    from opd.driver import run

    summary = run(cfg, resume=args.resume, fresh=args.fresh, progress=not args.no_progress,
                  change_objective=args.change_objective)
    _print_table(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from opd.driver import run
    from opd.tasks.bootstrap import bootstrap, demo_spec

    cfg = _config(args)
    models_dir = Path(cfg.models.student).parent
    info = bootstrap(models_dir, demo_spec())
    print(f"models in {models_dir}: teacher {info.get('teacher_accuracy')}, "
          f"student {info.get('student_accuracy')} held-out accuracy after SFT")
    summary = run(cfg, fresh=True, progress=not args.no_progress)
    _print_table(summary)
    print(f"\nsummary: {Path(cfg.run.output_dir) / 'summary.json'}")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    if args.model:
        from opd.models.gguf import import_model

        info = import_model(args.model, Path(args.out or f"models/{args.model}"), force=args.force)
    else:
        from opd.tasks import bootstrap as bs

        if args.preset == "tools":
            from opd.agents.tool_bootstrap import bootstrap_tools

            info = bootstrap_tools(Path(args.out or "models/tools"), force=args.force)
        else:
            spec = {"demo": bs.demo_spec, "tiny": bs.tiny_spec}[args.preset]()
            info = bs.bootstrap(Path(args.out or "models/demo"), spec, force=args.force)
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from opd.models.prune import prune

    print(json.dumps(prune(Path(args.src), args.keep_layers, Path(args.out), force=args.force), indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from opd.preflight import check_model_dirs

    cfg = _config(args)
    check_model_dirs(cfg, teacher=args.teacher)  # before torch, Ray or vLLM are imported
    from opd.evaluation import evaluate_models

    result = evaluate_models(cfg, teacher=args.teacher)
    print(json.dumps(result, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from opd.monitor.report import main_report

    return main_report(args.run_dir, args.out)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve to anything


def _check_port_free(host: str, port: int) -> None:
    # Serve's proxy retries a taken port quietly; refusing here gives the user one clear line instead.
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--host {host} --port {port}: cannot bind ({e.strerror})") from None


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    model = Path(resolve("MODEL_DIR", args.model_dir) if is_hub_id(args.model_dir) else args.model_dir)
    if not (model / "config.json").is_file():
        raise ConfigError(f"MODEL_DIR: {str(model)!r} is not a save_pretrained directory (no config.json)")
    token = os.environ.get(args.token_env) or None
    if not _is_loopback(args.host) and not token:
        raise ConfigError(f"--host {args.host}: refusing to serve beyond this machine without a token; "
                          f"set the environment variable {args.token_env} (named by --token-env)")
    if not args.address:
        _check_port_free(args.host, args.port)
    from opd.teacher.server import ServerSettings, serve_forever

    settings = ServerSettings(
        model_dir=str(model), token=token, max_body_bytes=args.max_body_bytes,
        max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
        max_model_len=args.max_model_len, max_logprobs=args.max_logprobs,
        dtype=args.dtype, kv_cache_gib=args.kv_cache_gib, num_gpus=args.num_gpus,
    )
    serve_forever(settings, host=args.host, port=args.port, replicas=args.replicas, address=args.address)
    return 0


def _job_call(fn) -> int:
    from opd.submit import JobError

    try:
        return fn()
    except JobError as e:
        print(f"opd: error: {e}", file=sys.stderr)
        return 1


def cmd_submit(args: argparse.Namespace) -> int:
    # Checked here with every hub id resolved; sent with each pinned to the commit it resolved to, so the
    # cluster resolves the same files.
    given = load_config(args.config, args.overrides)
    cfg, pins = resolve_models(given)
    _check_job(cfg, args)
    from opd import submit
    from opd.cluster import cpus_needed
    from opd.driver import prepare

    address = submit.dashboard_address(args.address)
    # the job's inputs pass the same checks as `opd run` before anything is sent
    prepare(cfg, resume=args.resume, change_objective=args.change_objective)
    try:
        runtime_env = json.loads(args.runtime_env_json) if args.runtime_env_json else None
    except ValueError as e:
        raise ConfigError(f"--runtime-env-json: not JSON ({e})") from None
    resources = {k: v for k, v in (("entrypoint_num_cpus", args.entrypoint_num_cpus),
                                   ("entrypoint_num_gpus", args.entrypoint_num_gpus),
                                   ("entrypoint_memory", args.entrypoint_memory)) if v is not None}

    def go() -> int:
        job_id = submit.submit(given.with_keys(pins), address, args.working_dir, job_id=args.submission_id,
                               resume=args.resume,
                               runtime_env=runtime_env, resources=resources,
                               change_objective=args.change_objective)
        print(job_id, flush=True)
        print(f"run directory: {Path(cfg.run.output_dir).resolve()}; "
              f"the job's actors need {cpus_needed(cfg)} Ray CPUs "
              f"on the cluster; follow it with: opd logs {job_id} --follow --address {address}",
              file=sys.stderr)
        if not args.wait:
            return 0
        for chunk in submit.follow_logs(address, job_id):
            print(chunk, end="", flush=True)
        final = submit.status(address, job_id)
        print(json.dumps(final, indent=2))
        return submit.EXIT_CODES.get(final["status"], 1)

    return _job_call(go)


def cmd_status(args: argparse.Namespace) -> int:
    from opd import submit

    def go() -> int:
        info = submit.status(submit.dashboard_address(args.address), args.job_id)
        print(json.dumps(info, indent=2))
        return submit.EXIT_CODES.get(info["status"], 1)

    return _job_call(go)


def cmd_list(args: argparse.Namespace) -> int:
    from opd import submit

    def go() -> int:
        jobs = submit.list_jobs(submit.dashboard_address(args.address))
        for j in jobs:
            print(f"{j['job_id']}  {j['status']:<9}  {j['name'] or '-'}")
        return 0

    return _job_call(go)


def cmd_logs(args: argparse.Namespace) -> int:
    from opd import submit

    def go() -> int:
        address = submit.dashboard_address(args.address)
        chunks = (submit.follow_logs(address, args.job_id) if args.follow
                  else [submit.logs(address, args.job_id)])
        for chunk in chunks:
            print(chunk, end="", flush=True)
        return submit.EXIT_CODES.get(submit.job_state(address, args.job_id), 1) if args.follow else 0

    return _job_call(go)


def cmd_stop(args: argparse.Namespace) -> int:
    from opd import submit

    def go() -> int:
        print("stopped" if submit.stop(submit.dashboard_address(args.address), args.job_id)
              else "not running")
        return 0

    return _job_call(go)


def _positive(kind):
    """argparse type: a positive number (argparse reports a bad value with exit code 2, like a bad config)."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _add_service_parsers(sub) -> None:
    p = sub.add_parser("serve-teacher",
                       help="serve a teacher model over HTTP with Ray Serve (docs/service.md)")
    p.add_argument("model_dir", help="teacher save_pretrained directory or hub id (ORG/NAME[@REVISION])")
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs a token")
    p.add_argument("--port", type=_positive(int), default=8000)
    p.add_argument("--replicas", type=_positive(int), default=1, help="engine replicas (one Ray actor each)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (0 on a CPU machine)")
    p.add_argument("--token-env", default="OPD_TEACHER_TOKEN",
                   help="env var holding the bearer token; when set, every path but /health needs it")
    p.add_argument("--max-logprobs", type=_positive(int), default=20,
                   help="largest top_k a request may ask for")
    p.add_argument("--max-model-len", type=_positive(int), default=None,
                   help="longest sequence (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=_positive(int), default=8,
                   help="/v1/score requests merged into one engine call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    p.add_argument("--max-body-bytes", type=_positive(int), default=16 << 20,
                   help="larger request bodies get 413")
    p.add_argument("--kv-cache-gib", type=_positive(float), default=1.0,
                   help="CPU KV cache per replica (vllm-cpu)")
    p.add_argument("--address", help="deploy on this running Ray cluster instead of an embedded one")
    p.set_defaults(fn=cmd_serve_teacher)
    dash = {"help": "the Ray dashboard, e.g. http://127.0.0.1:8265 "
                    "(default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)"}
    p = sub.add_parser("submit", help="run a config as a Ray job on a cluster (Job API)",
                       description="Relative model paths and run.output_dir are resolved to absolute "
                                   "paths on this machine before staging: they must exist at the same "
                                   "place on the cluster.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--address", **dash)
    p.add_argument("--working-dir", help="a directory shipped with the job (e.g. your verifier package)")
    p.add_argument("--wait", action="store_true", help="follow the job's logs; exit 0 only if it succeeds")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in run.output_dir from its newest checkpoint")
    p.add_argument("--change-objective", action="store_true",
                   help="with --resume: go on under this config's objective "
                   "though the run was trained with another")
    p.add_argument("--submission-id", help="the job's id (default RUN-YYYYMMDD-HHMMSS from run.name)")
    p.add_argument("--runtime-env-json",
                   help="Ray runtime_env as JSON (env_vars, pip, ...); opd sets working_dir")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver process")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver process")
    p.add_argument("--entrypoint-memory", type=int, help="memory (bytes) reserved for the driver process")
    p.set_defaults(fn=cmd_submit)
    p = sub.add_parser("list", help="the cluster's jobs: id, state, run name")
    p.add_argument("--address", **dash)
    p.set_defaults(fn=cmd_list)
    for name, fn, help_ in (("status", cmd_status,
                             "a job's state, run directory and last step (exit 1 if it failed)"),
                            ("logs", cmd_logs, "a job's logs"), ("stop", cmd_stop, "stop a job")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job_id")
        p.add_argument("--address", **dash)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.set_defaults(fn=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation on Ray + vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a distillation job from a config")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in run.output_dir")
    p.add_argument("--fresh", action="store_true",
                   help="replace a run already in run.output_dir (default: refuse)")
    p.add_argument("--change-objective", action="store_true",
                   help="with --resume: go on under this config's objective "
                   "though the run was trained with another")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("demo", help="the embedded default: bootstrap tiny models, distil on CPU, evaluate")
    _add_config_args(p, default="configs/demo.yaml")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("bootstrap",
                       help="build the tiny demo checkpoints, or a packaged real model (--model)")
    p.add_argument("--out", help="output directory (default models/demo, models/tools with --preset tools, "
                                 "or models/MODEL with --model)")
    p.add_argument("--preset", choices=["demo", "tiny", "tools"], default="demo",
                   help="which tiny pair to train (tools: the calc-tool task of configs/tools.yaml)")
    p.add_argument("--model", choices=sorted(MODELS),
                   help="a real model shipped as a GGUF package, dequantised into "
                        "an HF checkpoint (e.g. smollm2: SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(fn=cmd_bootstrap)
    p = sub.add_parser("prune", help="a depth-pruned student: keep some of a checkpoint's decoder layers")
    p.add_argument("src", help="source save_pretrained directory (e.g. models/smollm2)")
    p.add_argument("--keep-layers", required=True,
                   help="every:K (ceil(L/K) layers evenly spaced, first and last kept) "
                   "or a list like 0-9,20,29")
    p.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite --out even if it holds something else")
    p.set_defaults(fn=cmd_prune)
    p = sub.add_parser("eval", help="held-out accuracy of models.student (and the teacher with --teacher)")
    _add_config_args(p)
    p.add_argument("--teacher", action="store_true", help="also evaluate models.teacher")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("report", help="PNG curves and a markdown summary of a run directory")
    p.add_argument("run_dir", help="a run's output_dir (metrics.jsonl, summary.json)")
    p.add_argument("--out", help="where to write (default RUN_DIR/report)")
    p.set_defaults(fn=cmd_report)
    _add_service_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = build_parser()
    # Overrides may follow flags (`opd run C --resume key=value`): argparse leaves those behind as
    # unrecognised.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"opd: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        why = teacher_server_error(e)
        if why is None:
            raise
        print(f"opd: error: the job stopped: {why}", file=sys.stderr)
        return EXIT_JOB_FAILED


def teacher_server_error(e: BaseException) -> str | None:
    """The teacher server's refusal behind ``e``, in its own words, or None when ``e`` is something else:
    raised in the teacher's actor (``ray.get`` re-raises it as an instance of ``TeacherServerError``), or in
    that actor's start (Ray then keeps only its text)."""
    if isinstance(e, TeacherServerError):
        return str(getattr(e, "cause", None) or e)
    found = re.findall(r"TeacherServerError: (.+)", str(e)) if type(e).__name__ == "ActorDiedError" else []
    return found[-1] if found else None


if __name__ == "__main__":
    sys.exit(main())
