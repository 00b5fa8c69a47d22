"""Where per-step metrics go: ``metrics.jsonl`` (one JSON object per step), TensorBoard events, the console,
Ray custom metrics (dashboard / Prometheus) when Ray is up, and W&B / MLflow when ``tracking.*`` enables
them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from opd.monitor.console import Console, eval_line
from opd.monitor.ray_metrics import RayMetricsSink
from opd.monitor.tracking import Trackers

if TYPE_CHECKING:
    from opd.config import TrackingConfig


class MetricsLogger:
    def __init__(
        self, run_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True, job: str = "run",
        shared_ray: bool = False,  # Ray outlives this driver (a cluster): flush its metrics export on close
        tracking: TrackingConfig | None = None,  # W&B / MLflow sinks, when enabled there
        config: dict | None = None,  # the run's config dump: W&B config, MLflow params
        run_name: str | None = None,  # the tracker run's display name (default: the job name)
        # off a terminal: at most one step line per this many seconds (0: every step)
        log_every_s: float = 0.0,
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
        # A bar on a terminal (unless progress is off); lines wherever else the output goes (a job log, CI)
        self.console = Console(total_steps, start_step, bar=None if progress else False,
                               min_interval_s=log_every_s)
        self.ray = RayMetricsSink(job, flush_on_close=shared_ray)
        self.ray.start(start_step)  # steps done, failures and restarts exist before the first step ends
        if start_step:
            truncate_jsonl(self.path, start_step)
        # Started last, so a tracker that fails to start (a ConfigError) leaves nothing else half-open.
        try:
            self.trackers = Trackers.open(tracking, run_dir, run_name=run_name or job, config=config,
                                          resume=start_step > 0)
        except BaseException:
            self._close_local()
            raise

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.ray.log(step, metrics)
        self.trackers.log(step, metrics)
        self.console.step(step, metrics)

    def held_out(self, label: str, metrics: dict) -> None:
        """Held-out results outside the steps (before and after training), on a line of their own."""
        self.ray.held_out(metrics)
        self.console.note(eval_line(label, metrics))

    def close(self) -> None:
        self.trackers.close()
        self._close_local()

    def _close_local(self) -> None:
        self.console.close()
        self.tb.flush()
        self.tb.close()
        self.ray.close()


def truncate_jsonl(path: Path, step: int) -> None:
    """On resume, drop the lines of ``path`` (JSON objects with a ``step``) of steps from ``step`` on, so the
    log holds each step exactly once. Written to a temporary file and renamed: a kill leaves the old file or
    the new."""
    if not path.exists():
        return
    # A driver killed mid-write leaves a torn last line; it belongs to a step after the checkpoint anyway.
    kept = [ln for ln in path.read_text().splitlines() if (s := _step_of(ln)) is not None and s < step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
