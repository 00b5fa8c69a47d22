"""Per-step metrics as Ray custom metrics (``ray.util.metrics``): the Ray dashboard and its Prometheus export.

Each metric is named ``opd_*`` and tagged ``job`` (``run.name``) and ``role`` (the pipeline role that produced it).
Ray's exporter prefixes custom metrics with ``ray_``, so Prometheus sees e.g. ``ray_opd_teacher_kl{job="demo",
role="teacher"}`` on the node's ``--metrics-export-port``. Without an initialised Ray the sink does nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

TAG_KEYS = ("job", "role")


@dataclass(frozen=True)
class MetricSpec:
    key: str  # key of the driver's per-step metrics dict
    name: str  # Ray metric name
    role: str
    description: str
    # a running total of the per-step value, as a Gauge: unlike a Ray Counter (which refuses an increment of 0) the
    # series exists from step 0, so a dashboard shows "0 so far" rather than no data
    cumulative: bool = False


SPECS = (
    MetricSpec("reward", "opd_reward", "verifier", "mean verifier reward of the step's samples"),
    MetricSpec("accuracy", "opd_accuracy", "verifier", "fraction of the step's samples the first verifier marks correct"),
    MetricSpec("teacher_kl", "opd_teacher_kl", "teacher", "per-token sampled reverse KL, student vs teacher (nats)"),
    MetricSpec("entropy", "opd_entropy", "learner", "mean per-token entropy of the student (nats)"),
    MetricSpec("rollout_tokens_per_s", "opd_rollout_tokens_per_s", "rollout", "sampled response tokens per second"),
    MetricSpec("score_tokens_per_s", "opd_score_tokens_per_s", "teacher", "teacher-scored response tokens per second"),
    MetricSpec("train_tokens_per_s", "opd_train_tokens_per_s", "learner", "trained tokens per second"),
    MetricSpec("step_seconds", "opd_step_seconds", "driver", "wall time of the last step (s)"),
    MetricSpec("weight_version", "opd_weight_version", "learner", "weight version the rollout workers serve"),
    MetricSpec("eval_accuracy", "opd_eval_accuracy", "eval", "held-out greedy accuracy of the student"),
    MetricSpec("eval_teacher_kl", "opd_eval_teacher_kl", "eval", "held-out per-token KL(student || teacher) (nats)"),
    MetricSpec("verifier_failures", "opd_verifier_failures", "verifier",
               "verifier rows failed so far (raised, hung, bad output)", cumulative=True),
    MetricSpec("rollout_worker_restarts", "opd_rollout_worker_restarts", "rollout",
               "dead rollout workers replaced so far by this driver"),
)


def metric_values(metrics: dict[str, float]) -> list[tuple[MetricSpec, float]]:
    """The (spec, value) pairs of a step's metrics dict that have a Ray metric and a finite value."""
    out = []
    for spec in SPECS:
        value = metrics.get(spec.key)
        if isinstance(value, int | float) and math.isfinite(value):
            out.append((spec, float(value)))
    return out


class RayMetricsSink:
    """Records each step's metrics as Ray Gauges/Counters tagged with the job name and role.

    ``flush_on_close``: Ray exports a process's metrics every ``metrics_report_interval_ms`` (10 s by default) and
    not at exit, so a driver that ends sooner after its last step never exports that step. On a cluster that
    outlives the driver (``--address``, ``opd submit``) ``close`` therefore waits for one more export; an embedded
    Ray goes down with the driver, so there it would only waste time.
    """

    def __init__(self, job: str, flush_on_close: bool = False):
        self.job, self.flush_on_close = job, flush_on_close
        self._metrics: dict[str, object] | None = None  # built on first use, in a process where Ray is up
        self._step = None
        self._last_record = None
        self._totals: dict[str, float] = {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import ray

        if not ray.is_initialized():
            return
        if self._metrics is None:
            from ray.util.metrics import Gauge

            self._metrics = {s.key: Gauge(s.name, s.description, TAG_KEYS) for s in SPECS}
            self._step = Gauge("opd_step", "steps completed", TAG_KEYS)
        for spec, value in metric_values(metrics):
            if spec.cumulative:
                value = self._totals[spec.key] = self._totals.get(spec.key, 0.0) + value
            self._metrics[spec.key].set(value, tags={"job": self.job, "role": spec.role})
        self._step.set(step + 1, tags={"job": self.job, "role": "driver"})
        self._last_record = time.monotonic()

    def close(self) -> None:
        import ray

        if not (self.flush_on_close and self._last_record is not None and ray.is_initialized()):
            return
        from ray._raylet import Config  # Ray's own setting; no public accessor exists

        remaining = Config.metrics_report_interval_ms() / 1000 - (time.monotonic() - self._last_record)
        if remaining > 0:
            time.sleep(remaining + 1.0)
