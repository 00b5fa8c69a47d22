"""A role's own metrics, recorded in the role's process (rollout worker, teacher, learner rank, verifier
runner) as Ray custom metrics. Below every role, so the roles import it and nothing above; ``opd.monitor``
(the driver's sinks, the Grafana board) reads these tables too.

Every series is named ``opd_*`` and tagged ``run`` (``run.name``; not ``job``, which Prometheus sets to the
scrape job and would rename ours to ``exported_job``), ``role`` and ``replica`` (rollout worker index, learner
rank, teacher name, verifier name). Without an initialised Ray (or without Ray installed) nothing is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROLE_TAG_KEYS = ("run", "role", "replica")


@dataclass(frozen=True)
class MetricSpec:
    # the key of the record it comes from (the driver's step metrics, or a role's RoleMetrics.record)
    key: str
    name: str  # Ray metric name
    role: str
    description: str
    # a running total, as a Gauge: unlike a Ray Counter (which refuses an increment of 0) the series exists
    # from its first record, so a dashboard shows "0 so far" rather than no data
    cumulative: bool = False


ROLE_SPECS = (
    MetricSpec("tokens_per_s", "opd_rollout_worker_tokens_per_s", "rollout",
               "this worker's sampled tokens per second over its last generate call"),
    MetricSpec("tokens", "opd_rollout_worker_tokens", "rollout", "tokens this worker has sampled",
               cumulative=True),
    MetricSpec("weight_version", "opd_rollout_worker_weight_version", "rollout",
               "weight version this worker serves (loaded and probe-checked)"),
    MetricSpec("tokens_per_s", "opd_teacher_worker_tokens_per_s", "teacher",
               "this teacher's scored tokens per second over its last scoring call"),
    MetricSpec("tokens", "opd_teacher_worker_tokens", "teacher", "tokens this teacher has scored",
               cumulative=True),
    MetricSpec("tokens_per_s", "opd_learner_tokens_per_s", "learner",
               "this rank's trained tokens per second"),
    MetricSpec("tokens", "opd_learner_tokens", "learner", "tokens this rank has trained on", cumulative=True),
    MetricSpec("activation_mib", "opd_learner_activation_mib", "learner",
               "this rank's peak saved activations (MiB)"),
    MetricSpec("version", "opd_learner_weight_version", "learner", "weight version this rank holds"),
    MetricSpec("rows", "opd_verifier_rows", "verifier", "rows this verifier has scored", cumulative=True),
    MetricSpec("failed_rows", "opd_verifier_failed_rows", "verifier",
               "rows this verifier failed (raised, hung, bad output)", cumulative=True),
    MetricSpec("seconds", "opd_verifier_seconds", "verifier", "wall time of the last scoring call (s)"),
)


def metric_values(metrics: dict[str, float], specs: tuple[MetricSpec, ...]) -> list[tuple[MetricSpec, float]]:
    """The (spec, value) pairs of a record that have a Ray metric and a finite value."""
    out = []
    for spec in specs:
        value = metrics.get(spec.key)
        if isinstance(value, int | float) and math.isfinite(value):
            out.append((spec, float(value)))
    return out


class _Gauges:
    """Gauges made on first use, in the process that records (a Gauge belongs to the process that created
    it)."""

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


class RoleMetrics:
    """A role's own series (``ROLE_SPECS`` of ``role``), recorded in its process.

    ``job`` and ``replica`` default to the calling actor's name, ``<job>/<role>-<replica>`` (how
    ``opd.cluster`` names every role's actor); outside a named actor, or without them, nothing is recorded.
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
        # a learner driven where Ray is not installed (a lent GPU machine): no series to feed
        except ImportError:
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
