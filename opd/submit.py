"""``opd submit | status | logs | stop``: a config run as a Ray job through the Job API.

    opd submit configs/demo.yaml trainer.total_steps=100 --address http://HEAD:8265 --wait
    opd status raysubmit_XXXX --address http://HEAD:8265

The config (overrides applied) is written as YAML into a fresh staging directory together with every verifier
file named by path in ``verifiers.functions``; that directory (plus a copy of ``--working-dir`` if given) becomes
the job's ``runtime_env.working_dir`` and the entrypoint is ``python -m opd.cli run <staged config> --address auto``.
Model directories and ``run.output_dir`` are *not* shipped: relative ones are resolved to absolute paths on this
machine, so they must exist at the same place on the cluster (shared filesystem, same image) or be given absolute.
``ray job status/logs/stop`` work on the same job ids.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from opd.config import Config, ConfigError, build_config, dump_config
from opd.rewards.registry import file_spec

STAGE_DIR = "opd_job"  # inside the working dir: the staged config and verifier files
# Never worth uploading; Ray caps a working dir at 500 MiB, so keep models and runs out of it too.
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache")


class JobError(RuntimeError):
    """The cluster could not be reached or refused a request (names the address and job)."""


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def staged_config(cfg: Config, stage: Path) -> Config:
    """A copy of ``cfg`` with local paths made absolute and verifier files copied into ``stage/verifiers``."""
    tree = cfg.model_dump(mode="json")
    tree["models"]["student"] = _absolute(cfg.models.student)
    tree["models"]["teacher"] = _absolute(cfg.models.teacher)
    tree["run"]["output_dir"] = _absolute(cfg.run.output_dir)
    if cfg.exopd.reference:
        tree["exopd"]["reference"] = _absolute(cfg.exopd.reference)
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
    # RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), but the Job SDK client only when RAY_AUTH_MODE=token was set before
    # Ray was imported. Ray's own helper (the one ray.init calls) sets the mode and refreshes Ray's cached config, so
    # a cluster started with the default auth answers; an explicit RAY_AUTH_MODE always wins.
    from ray._private.authentication import authentication_token_setup as setup

    quiet = logging.getLogger(setup.__name__)  # its "enabled for this Ray cluster" notice is meant for `ray start`
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    _use_token_auth_if_available()

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # Ray raises ConnectionError / RuntimeError with its own wording
        raise JobError(f"cannot reach the Ray dashboard at {address}: {e}") from None


def submit(cfg: Config, address: str, working_dir: str | None = None) -> str:
    """Stage and submit ``cfg``; returns the job id. Nothing is left on disk here (the staging dir is removed)."""
    with tempfile.TemporaryDirectory(prefix="opd-submit-") as tmp:
        stage = Path(tmp) / "job"
        if working_dir:
            src = Path(working_dir)
            if not src.is_dir():
                raise ConfigError(f"--working-dir: {working_dir!r} is not a directory")
            shutil.copytree(src, stage, ignore=COPY_IGNORE)
        stage.mkdir(exist_ok=True)
        if (stage / STAGE_DIR).exists():
            raise ConfigError(f"--working-dir: {working_dir!r} already holds '{STAGE_DIR}/', which opd submit writes")
        staged = staged_config(cfg, stage)
        config_path = stage / STAGE_DIR / "config.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(dump_config(staged))
        entrypoint = f"python -m opd.cli run {STAGE_DIR}/config.yaml --address auto --no-progress"
        client = job_client(address)
        try:
            # The working dir is zipped and uploaded inside submit_job, so the staging dir may go afterwards.
            return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(stage)},
                                     metadata={"opd_run": cfg.run.name})
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
    info = _call(address, job_id, "status", lambda c: c.get_job_info(job_id))
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time}


def logs(address: str, job_id: str) -> str:
    return _call(address, job_id, "logs", lambda c: c.get_job_logs(job_id))


def follow_logs(address: str, job_id: str) -> Iterator[str]:
    """Log chunks as the job writes them, until it ends (Ray's tail is async; this drives it from sync code)."""
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
