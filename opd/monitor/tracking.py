"""Experiment-tracker sinks: Weights & Biases and MLflow, driven by ``MetricsLogger`` when ``tracking.*``
enables them.

Both run without network by default: W&B in offline mode writes under ``RUN_DIR/wandb`` (``wandb sync``
uploads it later) and MLflow writes a file store under ``RUN_DIR/mlruns``. The run ids are kept in
``RUN_DIR/tracking.json`` so ``--resume`` appends to the same W&B / MLflow run instead of starting a new one.

Failure policy: a tracker that cannot start is a configuration problem and stops the run with a
``ConfigError`` naming the key; a tracker that fails while logging only warns, because ``metrics.jsonl`` is
the source of truth and a flaky tracking server must not cost a training run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from opd.errors import ConfigError

if TYPE_CHECKING:
    from opd.config import TrackingConfig

log = logging.getLogger("opd.tracking")

STATE_FILE = "tracking.json"
_MLFLOW_PARAM_MAX = 6000  # MLflow's limit on a parameter value's length
_MLFLOW_BAD_KEY = re.compile(r"[^\w\-. /]")  # MLflow accepts alphanumerics, _ - . space and /


class WandbTracker:
    name = "wandb"

    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, config: dict | None,
                 run_id: str | None):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        resumed = run_id is not None
        self.run = wandb.init(
            project=cfg.wandb_project, name=run_name, id=run_id or secrets.token_hex(4), resume="allow",
            # A resumed run gets its config below with allow_val_change: a resume may change e.g. total_steps.
            dir=str(run_dir), mode=cfg.wandb_mode, config=None if resumed else (config or {}),
            # console="off": W&B must not wrap stdout/stderr (the progress bar, the Ray log stream);
            # create_new: never reuse or finish a run the user's own code has open in this process.
            settings=wandb.Settings(silent=True, console="off", reinit="create_new"),
        )
        if resumed and config:
            self.run.config.update(config, allow_val_change=True)
        self.state = {"id": self.run.id, "project": cfg.wandb_project, "mode": cfg.wandb_mode}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, config: dict | None,
                 previous: dict):
        uri = cfg.mlflow_tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        file_store = urlparse(uri).scheme in ("", "file")
        if file_store:
            # MLflow 3 refuses a file store unless told otherwise; a local, server-less store is the point
            # here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # The file store makes each '/' in a metric name a directory, so "reward" next to "reward/x" collides.
        self.slash = "." if file_store else "/"
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        run_id = previous.get("run_id") if previous.get("tracking_uri") == uri else None
        if previous.get("run_id") and run_id is None:
            log.warning("tracking.mlflow_tracking_uri changed since the last attempt (%s -> %s): "
                        "starting a new MLflow run", previous.get("tracking_uri"), uri)
        params = _flatten(config or {})
        if run_id is not None:
            logged = self.client.get_run(run_id).data.params
            self.client.update_run(run_id, status="RUNNING")
            # Params are immutable in MLflow: keep the first values; config.json below holds the resumed
            # config.
            params = {k: v for k, v in params.items() if k not in logged}
        else:
            exp = self.client.get_experiment_by_name(cfg.mlflow_experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.mlflow_experiment)
            run_id = self.client.create_run(exp_id, run_name=run_name,
                                            tags={"opd.run_dir": str(run_dir)}).info.run_id
        self.run_id = run_id
        items = [Param(_mlflow_key(k), v[:_MLFLOW_PARAM_MAX]) for k, v in params.items()]
        for lo in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(run_id, params=items[lo : lo + 100])
        if config:
            self.client.log_dict(run_id, config, "config.json")
        self.state = {"run_id": run_id, "tracking_uri": uri, "experiment": cfg.mlflow_experiment}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        batch = [Metric(_mlflow_key(k).replace("/", self.slash), v, ms, step) for k, v in metrics.items()]
        for lo in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=batch[lo : lo + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


class Trackers:
    """The enabled trackers of one run; ``log`` never raises (see the module docstring)."""

    def __init__(self, trackers: list):
        self.trackers = trackers
        self.failures = {t.name: 0 for t in trackers}

    @classmethod
    def open(
        cls, cfg: TrackingConfig | None, run_dir: Path, *, run_name: str, config: dict | None, resume: bool
    ) -> Trackers:
        """Start the trackers ``cfg`` enables; on ``resume`` reattach to the runs recorded in
        RUN_DIR/tracking.json."""
        if cfg is None or not (cfg.wandb or cfg.mlflow):
            return cls([])
        state_path = run_dir / STATE_FILE
        previous = _read_state(state_path) if resume else {}
        run_dir.mkdir(parents=True, exist_ok=True)
        opened: list = []
        try:
            if cfg.wandb:
                wb = previous.get("wandb", {})
                same = wb.get("project") == cfg.wandb_project
                opened.append(_start("tracking.wandb", lambda: WandbTracker(
                    cfg, run_dir, run_name, config, wb.get("id") if same else None)))
            if cfg.mlflow:
                opened.append(_start("tracking.mlflow", lambda: MlflowTracker(
                    cfg, run_dir, run_name, config, previous.get("mlflow", {}))))
        except BaseException:
            for t in opened:
                _quietly(t.close)
            raise
        state = {**previous, **{t.name: t.state for t in opened}}
        tmp = state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, state_path)
        return cls(opened)

    def log(self, step: int, metrics: dict[str, object]) -> None:
        if not self.trackers:
            return
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        for t in self.trackers:
            try:
                t.log(step, numeric)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                self.failures[t.name] += 1
                if self.failures[t.name] == 1:  # once; the count is reported at close
                    log.warning("tracking.%s: logging step %d failed (%s: %s); training goes on, "
                                "metrics.jsonl has every step", t.name, step, type(e).__name__, e)

    def close(self) -> None:
        for t in self.trackers:
            _quietly(t.close, f"tracking.{t.name}: closing the run failed")
            if self.failures[t.name]:
                log.warning("tracking.%s: %d step(s) could not be logged; metrics.jsonl has them", t.name,
                            self.failures[t.name])
        self.trackers = []


def _start(key: str, make):
    try:
        return make()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{key}: could not start the tracker: {type(e).__name__}: {e}") from e


def _quietly(fn, what: str = "tracking: cleanup failed") -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        log.warning("%s (%s: %s)", what, type(e).__name__, e)


def _read_state(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): the trackers start new runs", path, e)
        return {}
    return state if isinstance(state, dict) else {}


def _flatten(obj: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys with string values (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def _mlflow_key(key: str) -> str:
    # Metric names such as "reward/path/to/file.py:fn" carry characters MLflow rejects (':'), and one bad key
    # would fail the whole batch.
    return _MLFLOW_BAD_KEY.sub("_", key)
