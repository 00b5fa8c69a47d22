"""opd's series as Ray custom metrics (``ray.util.metrics``): the Ray dashboard, its Prometheus export, Grafana.

Every series is named ``opd_*`` and tagged ``run`` (``run.name``; not ``job``, which Prometheus sets to the
scrape job and would rename ours to ``exported_job``) and ``role``. Ray's exporter prefixes custom metrics with
``ray_`` (and adds ``WorkerId``, ``NodeAddress``, ``SessionName``), so Prometheus sees e.g.
``ray_opd_teacher_kl{run="demo",role="teacher"}`` on each node's ``--metrics-export-port``.

Two kinds, one table each:

- ``SPECS``: the step's summary, computed by the driver from what the roles returned (reward over the whole batch,
  the step's KL, throughput of the step's stage), recorded by ``RayMetricsSink`` once per step;
- ``ROLE_SPECS``: recorded by the role process that measures them, each tagged ``replica`` (rollout worker index,
  learner rank, teacher name, verifier name), through ``RoleMetrics``, whenever that role does its work.

Without an initialised Ray both record nothing. ``docker/grafana/opd.json`` draws these series.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

TAG_KEYS = ("run", "role")
ROLE_TAG_KEYS = ("run", "role", "replica")


@dataclass(frozen=True)
class MetricSpec:
    key: str  # the key of the record it comes from (the driver's step metrics, or a role's RoleMetrics.record)
    name: str  # Ray metric name
    role: str
    description: str
    # a running total, as a Gauge: unlike a Ray Counter (which refuses an increment of 0) the series exists from
    # its first record, so a dashboard shows "0 so far" rather than no data
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
STEP = MetricSpec("step", "opd_step", "driver", "steps completed")

ROLE_SPECS = (
    MetricSpec("tokens_per_s", "opd_rollout_worker_tokens_per_s", "rollout",
               "this worker's sampled tokens per second over its last generate call"),
    MetricSpec("tokens", "opd_rollout_worker_tokens", "rollout", "tokens this worker has sampled", cumulative=True),
    MetricSpec("weight_version", "opd_rollout_worker_weight_version", "rollout",
               "weight version this worker serves (loaded and probe-checked)"),
    MetricSpec("tokens_per_s", "opd_teacher_worker_tokens_per_s", "teacher",
               "this teacher's scored tokens per second over its last scoring call"),
    MetricSpec("tokens", "opd_teacher_worker_tokens", "teacher", "tokens this teacher has scored", cumulative=True),
    MetricSpec("tokens_per_s", "opd_learner_tokens_per_s", "learner", "this rank's trained tokens per second"),
    MetricSpec("tokens", "opd_learner_tokens", "learner", "tokens this rank has trained on", cumulative=True),
    MetricSpec("activation_mib", "opd_learner_activation_mib", "learner", "this rank's peak saved activations (MiB)"),
    MetricSpec("version", "opd_learner_weight_version", "learner", "weight version this rank holds"),
    MetricSpec("rows", "opd_verifier_rows", "verifier", "rows this verifier has scored", cumulative=True),
    MetricSpec("failed_rows", "opd_verifier_failed_rows", "verifier",
               "rows this verifier failed (raised, hung, bad output)", cumulative=True),
    MetricSpec("seconds", "opd_verifier_seconds", "verifier", "wall time of the last scoring call (s)"),
)


def metric_values(metrics: dict[str, float], specs: tuple[MetricSpec, ...] = SPECS) -> list[tuple[MetricSpec, float]]:
    """The (spec, value) pairs of a record that have a Ray metric and a finite value."""
    out = []
    for spec in specs:
        value = metrics.get(spec.key)
        if isinstance(value, int | float) and math.isfinite(value):
            out.append((spec, float(value)))
    return out


class _Gauges:
    """Gauges made on first use, in the process that records (a Gauge belongs to the process that created it)."""

    def __init__(self, specs: tuple[MetricSpec, ...], tag_keys: tuple[str, ...]):
        self.specs, self.tag_keys = specs, tag_keys
        self._made: dict[str, object] = {}
        self._totals: dict[str, float] = {}

    def set(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        from ray.util.metrics import Gauge

        if spec.cumulative:
            total_key = spec.name + "/" + "/".join(tags[k] for k in self.tag_keys)
            value = self._totals[total_key] = self._totals.get(total_key, 0.0) + value
        if spec.name not in self._made:
            self._made[spec.name] = Gauge(spec.name, spec.description, self.tag_keys)
        self._made[spec.name].set(value, tags=tags)


class RayMetricsSink:
    """The driver's per-step series (``SPECS``), tagged with the job name and role.

    ``start`` records step 0's zeros (steps done, failures, restarts), so those series exist before the first step
    ends. ``flush_on_close``: Ray exports a process's metrics every ``metrics_report_interval_ms`` (10 s by
    default) and not at exit, so a driver that ends sooner after its last step never exports that step. On a
    cluster that outlives the driver (``--address``, ``opd submit``) ``close`` therefore waits for one more export;
    an embedded Ray goes down with the driver, so there it would only waste time.
    """

    def __init__(self, job: str, flush_on_close: bool = False):
        self.job, self.flush_on_close = job, flush_on_close
        self._gauges = _Gauges((*SPECS, STEP), TAG_KEYS)
        self._last_record = None

    def start(self, step: int) -> None:
        zeros = {s.key: 0.0 for s in SPECS if s.cumulative or s.key == "rollout_worker_restarts"}
        self._record({**zeros, "step": float(step)})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._record({**metrics, "step": float(step + 1)})

    def held_out(self, metrics: dict[str, float]) -> None:
        """Held-out figures measured outside a step (before and after training)."""
        self._record({k: v for k, v in metrics.items() if k.startswith("eval_")})

    def _record(self, metrics: dict[str, float]) -> None:
        import ray

        if not ray.is_initialized():
            return
        for spec, value in metric_values(metrics, (*SPECS, STEP)):
            self._gauges.set(spec, value, {"run": self.job, "role": spec.role})
        self._last_record = time.monotonic()

    def close(self) -> None:
        import ray

        if not (self.flush_on_close and self._last_record is not None and ray.is_initialized()):
            return
        from ray._raylet import Config  # Ray's own setting; no public accessor exists

        remaining = Config.metrics_report_interval_ms() / 1000 - (time.monotonic() - self._last_record)
        if remaining > 0:
            time.sleep(remaining + 1.0)


class RoleMetrics:
    """A role's own series (``ROLE_SPECS`` of ``role``), recorded in its process.

    ``job`` and ``replica`` default to the calling actor's name, ``<job>/<role>-<replica>`` (how ``opd.cluster``
    names every role's actor); outside a named actor, or without them, nothing is recorded.
    """

    def __init__(self, role: str, job: str | None = None, replica: str | None = None):
        self.role, self.job, self.replica = role, job, replica
        specs = tuple(s for s in ROLE_SPECS if s.role == role)
        if not specs:
            raise ValueError(f"no opd series for role {role!r}")
        self._gauges = _Gauges(specs, ROLE_TAG_KEYS)
        self._looked_up = job is not None  # an actor's name never changes: look it up once

    def _identity(self) -> bool:
        try:
            import ray
        except ImportError:  # a learner driven where Ray is not installed (a lent GPU machine): no series to feed
            return False
        if not ray.is_initialized():
            return False
        if not self._looked_up:
            self._looked_up = True
            job, _, tail = (ray.get_runtime_context().get_actor_name() or "").rpartition("/")
            if job and tail.startswith(self.role + "-"):
                self.job, self.replica = job, self.replica or tail[len(self.role) + 1:]
        return self.job is not None

    def record(self, replica: str | None = None, **values: float) -> None:
        """Set (or, for running totals, add) this role's series; ``replica`` overrides the instance tag."""
        if not self._identity() or (replica := replica or self.replica) is None:
            return
        tags = {"run": self.job, "role": self.role, "replica": replica}
        for spec, value in metric_values(values, self._gauges.specs):
            self._gauges.set(spec, value, tags)
