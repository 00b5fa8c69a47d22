"""``opd submit | status | logs | stop``: a config run as a Ray job through the Job API.

    opd submit configs/demo.yaml trainer.total_steps=100 --address http://HEAD:8265 --wait
    opd status raysubmit_XXXX --address http://HEAD:8265

The config (overrides applied) is written as YAML into a fresh staging directory together with every verifier
file named by path in ``verifiers.functions``; that directory (plus a copy of ``--working-dir`` if given)
becomes the job's ``runtime_env.working_dir`` and the entrypoint is ``python -m opd.cli run <staged config>
--address auto``. Model directories and ``run.output_dir`` are *not* shipped: relative ones are resolved to
absolute paths on this machine, so they must exist at the same place on the cluster (shared filesystem, same
image) or be given absolute.
``ray job status/logs/stop`` work on the same job ids.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from opd.config import Config, ConfigError, build_config, dump_config
from opd.models.hub import is_hub_id, model_keys
from opd.rewards.registry import file_spec

STAGE_DIR = "opd_job"  # inside the working dir: the staged config and verifier files
# Never worth uploading; Ray caps a working dir at 500 MiB, so keep models and runs out of it too.
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache")


class JobError(RuntimeError):
    """The cluster could not be reached or refused a request (names the address and job)."""


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _pinned(value: str) -> bool:
    return "@" in value and is_hub_id(value)


def staged_config(cfg: Config, stage: Path) -> Config:
    """A copy of ``cfg`` with local paths made absolute and verifier files copied into ``stage/verifiers``."""
    # Hub ids come pinned to a commit (ORG/NAME@COMMIT, by `opd submit`) and go as they are; the rest are
    # paths.
    local = {key: _absolute(value) for key, value in model_keys(cfg) if value and not _pinned(value)}
    tree = cfg.with_keys(local).model_dump(mode="json")
    tree["run"]["output_dir"] = _absolute(cfg.run.output_dir)
    problems = []
    for i, entry in enumerate(tree["verifiers"]["functions"]):
        spec = file_spec(entry["name"])
        if spec is None:
            continue  # a registered name or an importable module: nothing to ship
        src = Path(spec[0]).expanduser()
        if not src.is_file():
            problems.append(f"  verifiers.functions.{i}.name: file {str(src)!r} does not exist")
            continue
        dest = stage / STAGE_DIR / "verifiers" / f"{i}_{src.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        entry["name"] = f"{dest.relative_to(stage).as_posix()}:{spec[1]}"  # relative to the job's working dir
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
    return build_config(tree)


def _use_token_auth_if_available() -> None:
    # Ray 2.60: `ray start` and `ray.init` switch token auth on when this user has a token (RAY_AUTH_TOKEN,
    # RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), but the Job SDK client only when RAY_AUTH_MODE=token was set
    # before Ray was imported. Ray's own helper (the one ray.init calls) sets the mode and refreshes Ray's
    # cached config, so a cluster started with the default auth answers; an explicit RAY_AUTH_MODE always
    # wins.
    from ray._private.authentication import authentication_token_setup as setup

    # its "enabled for this Ray cluster" notice is meant for `ray start`
    quiet = logging.getLogger(setup.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def dashboard_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS`` as Ray's own CLI reads them."""
    found = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not found:
        raise ConfigError("--address: give the Ray dashboard (http://HOST:8265) or set RAY_ADDRESS")
    return found


def job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    _use_token_auth_if_available()

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # Ray raises ConnectionError / RuntimeError with its own wording
        raise JobError(f"cannot reach the Ray dashboard at {address}: {e}") from None


def submission_id(cfg: Config, given: str | None = None) -> str:
    """The job's id in the dashboard: ``--submission-id``, else ``RUN-YYYYMMDD-HHMMSS`` (the run's name)."""
    return given or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def submit(cfg: Config, address: str, working_dir: str | None = None, *, job_id: str | None = None,
           resume: bool = False, runtime_env: dict | None = None, resources: dict | None = None,
           change_objective: bool = False) -> str:
    """Stage and submit ``cfg``; returns the job id. Nothing is left on disk here (the staging dir is
    removed).
    ``runtime_env`` is merged under the staged working dir (env_vars, pip, ...); ``resources``: the
    entrypoint's
    ``entrypoint_num_cpus`` / ``entrypoint_num_gpus`` / ``entrypoint_memory``."""
    with tempfile.TemporaryDirectory(prefix="opd-submit-") as tmp:
        stage = Path(tmp) / "job"
        if working_dir:
            src = Path(working_dir)
            if not src.is_dir():
                raise ConfigError(f"--working-dir: {working_dir!r} is not a directory")
            shutil.copytree(src, stage, ignore=COPY_IGNORE)
        stage.mkdir(exist_ok=True)
        if (stage / STAGE_DIR).exists():
            raise ConfigError(f"--working-dir: {working_dir!r} already holds '{STAGE_DIR}/', "
                              "which opd submit writes")
        staged = staged_config(cfg, stage)
        config_path = stage / STAGE_DIR / "config.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(dump_config(staged))
        entrypoint = f"python -m opd.cli run {STAGE_DIR}/config.yaml --address auto --no-progress"
        if resume:
            entrypoint += " --resume" + (" --change-objective" if change_objective else "")
        client = job_client(address)
        metadata = {"job_name": cfg.run.name, "opd_run": cfg.run.name, "run_dir": staged.run.output_dir}
        try:
            # The working dir is zipped and uploaded inside submit_job, so the staging dir may go afterwards.
            return client.submit_job(entrypoint=entrypoint, submission_id=submission_id(cfg, job_id),
                                     runtime_env={**(runtime_env or {}), "working_dir": str(stage)},
                                     metadata=metadata, **(resources or {}))
        except Exception as e:
            raise JobError(f"submitting to {address} failed: {e}") from None


def _call(address: str, job_id: str, what: str, fn):
    try:
        return fn(job_client(address))
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"{what} of job {job_id!r} at {address} failed: {e}") from None


def status(address: str, job_id: str) -> dict:
    """The job's state, its run directory and the last step it logged (from that directory's metrics.jsonl
    when this machine sees it, else from the job's log lines)."""
    info = _call(address, job_id, "status", lambda c: c.get_job_info(job_id))
    meta = info.metadata or {}
    out = {"job_id": job_id, "name": meta.get("job_name"), "status": str(info.status.value),
           "message": info.message,
           "run_dir": meta.get("run_dir"), "entrypoint": info.entrypoint, "start_time": info.start_time,
           "end_time": info.end_time}
    out["last_step"] = _last_metrics(meta.get("run_dir")) or _last_step_line(logs(address, job_id))
    return out


def job_state(address: str, job_id: str) -> str:
    """Only the job's state (no metadata, no log): what an exit code follows."""
    return str(_call(address, job_id, "status", lambda c: c.get_job_status(job_id)).value)


def _last_metrics(run_dir: str | None) -> dict | None:
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        return None
    try:
        row = json.loads(lines[-1])
    except ValueError:  # a line being written
        row = json.loads(lines[-2]) if len(lines) > 1 else {}
    keys = ("step", "reward", "accuracy", "teacher_kl", "step_seconds", "eval_accuracy", "eval_teacher_kl")
    return {k: row[k] for k in keys if row.get(k) is not None} or None


def _last_step_line(log: str) -> str | None:
    lines = [ln for ln in log.splitlines() if ln.startswith("step ")]
    return lines[-1] if lines else None


def list_jobs(address: str) -> list[dict]:
    jobs = _call(address, "*", "listing", lambda c: c.list_jobs())
    return [{"job_id": j.submission_id, "name": (j.metadata or {}).get("job_name"),
             "status": str(j.status.value), "start_time": j.start_time, "end_time": j.end_time}
            for j in sorted(jobs, key=lambda j: j.start_time or 0)]


# `opd status`, `opd logs --follow` and `opd submit --wait` exit with the job's state: 0 done or still going
EXIT_CODES = {"SUCCEEDED": 0, "RUNNING": 0, "PENDING": 0, "FAILED": 1, "STOPPED": 3}


def logs(address: str, job_id: str) -> str:
    return _call(address, job_id, "logs", lambda c: c.get_job_logs(job_id))


def follow_logs(address: str, job_id: str) -> Iterator[str]:
    """Log chunks as the job writes them, until it ends (Ray's tail is async; this drives it from sync
    code)."""
    client = job_client(address)
    loop = asyncio.new_event_loop()
    tail = client.tail_job_logs(job_id).__aiter__()
    try:
        while True:
            try:
                yield loop.run_until_complete(tail.__anext__())
            except StopAsyncIteration:
                return
            except Exception as e:
                raise JobError(f"logs of job {job_id!r} at {address} failed: {e}") from None
    finally:
        loop.run_until_complete(tail.aclose())
        loop.close()


def stop(address: str, job_id: str) -> bool:
    return _call(address, job_id, "stop", lambda c: c.stop_job(job_id))
