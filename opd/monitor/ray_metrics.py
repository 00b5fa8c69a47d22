"""opd's series as Ray custom metrics (``ray.util.metrics``): the Ray dashboard, its Prometheus export,
Grafana.

Every series is named ``opd_*`` and tagged ``run`` (``run.name``; not ``job``, which Prometheus sets to the
scrape job and would rename ours to ``exported_job``) and ``role``. Ray's exporter prefixes custom metrics
with
``ray_`` (and adds ``WorkerId``, ``NodeAddress``, ``SessionName``), so Prometheus sees e.g.
``ray_opd_teacher_kl{run="demo",role="teacher"}`` on each node's ``--metrics-export-port``.

Two kinds, one table each:

- ``SPECS``: the step's summary, computed by the driver from what the roles returned (reward over the whole
batch,
  the step's KL, throughput of the step's stage), recorded by ``RayMetricsSink`` once per step;
- ``ROLE_SPECS`` (``opd.metrics``, below the roles): recorded by the role process that measures them, each
tagged
  ``replica`` (rollout worker index, learner rank, teacher name, verifier name), through ``RoleMetrics``,
  whenever that role does its work.

Without an initialised Ray both record nothing. ``docker/grafana/opd.json`` draws these series.
"""

from __future__ import annotations

import time

from opd.agents.env import STOP_REASONS
from opd.metrics import MetricSpec, _Gauges
from opd.metrics import metric_values as _values

TAG_KEYS = ("run", "role")


SPECS = (
    MetricSpec("reward", "opd_reward", "verifier", "mean verifier reward of the step's samples"),
    MetricSpec("accuracy", "opd_accuracy", "verifier",
               "fraction of the step's samples the first verifier marks correct"),
    MetricSpec("teacher_kl", "opd_teacher_kl", "teacher",
               "per-token sampled reverse KL, student vs teacher (nats)"),
    MetricSpec("entropy", "opd_entropy", "learner", "mean per-token entropy of the student (nats)"),
    MetricSpec("rollout_tokens_per_s", "opd_rollout_tokens_per_s", "rollout",
               "sampled response tokens per second"),
    MetricSpec("score_tokens_per_s", "opd_score_tokens_per_s", "teacher",
               "teacher-scored response tokens per second"),
    MetricSpec("train_tokens_per_s", "opd_train_tokens_per_s", "learner", "trained tokens per second"),
    MetricSpec("step_seconds", "opd_step_seconds", "driver", "wall time of the last step (s)"),
    MetricSpec("weight_version", "opd_weight_version", "learner", "weight version the rollout workers serve"),
    MetricSpec("eval_accuracy", "opd_eval_accuracy", "eval", "held-out greedy accuracy of the student"),
    MetricSpec("eval_teacher_kl", "opd_eval_teacher_kl", "eval",
               "held-out per-token KL(student || teacher) (nats)"),
    MetricSpec("eval_tool_call_rate", "opd_eval_tool_call_rate", "eval",
               "agent jobs: share of the student's held-out greedy episodes that call a tool"),
    MetricSpec("eval_turns", "opd_eval_turns", "eval", "agent jobs: turns per held-out greedy episode"),
    MetricSpec("verifier_failures", "opd_verifier_failures", "verifier",
               "verifier rows failed so far (raised, hung, bad output)", cumulative=True),
    MetricSpec("rollout_worker_restarts", "opd_rollout_worker_restarts", "rollout",
               "dead rollout workers replaced so far by this driver"),
    # agent jobs (opd.agents.metrics; docs/episodes.md)
    *(MetricSpec(f"episode_{k}", f"opd_episode_{k}", "rollout", f"mean {k.replace('_', ' ')} per episode")
      for k in ("turns", "tool_calls", "tool_errors", "tool_timeouts")),
    MetricSpec("drift_rate", "opd_drift_rate", "rollout",
               "share of episodes ended because the chat template rewrote earlier turns"),
    *(MetricSpec(f"stop_{r}", f"opd_stop_{r}", "rollout", f"share of episodes that stopped: {r}")
      for r in STOP_REASONS),
    *(MetricSpec(f"teacher_kl_{k}", f"opd_teacher_kl_{k}", "teacher", f"teacher KL on {what} (nats/token)")
      for k, what in (("tool_call", "turns followed by an observation"),
                      ("after_observation", "the first tokens after an observation"),
                      ("answer", "the final answer turn"))),
)
STEP = MetricSpec("step", "opd_step", "driver", "steps completed")



def metric_values(metrics: dict[str, float],
                  specs: tuple[MetricSpec, ...] = SPECS) -> list[tuple[MetricSpec, float]]:
    """The (spec, value) pairs of a step record that have a Ray metric and a finite value."""
    return _values(metrics, specs)


class RayMetricsSink:
    """The driver's per-step series (``SPECS``), tagged with the job name and role.

    ``start`` records step 0's zeros (steps done, failures, restarts), so those series exist before the first
    step ends. ``flush_on_close``: Ray exports a process's metrics every ``metrics_report_interval_ms`` (10 s
    by default) and not at exit, so a driver that ends sooner after its last step never exports that step. On
    a cluster that outlives the driver (``--address``, ``opd submit``) ``close`` therefore waits for one more
    export; an embedded Ray goes down with the driver, so there it would only waste time.
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
