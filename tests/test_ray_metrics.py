"""The Ray metrics sink: which step metrics become ``opd_*`` metrics, and that it is inert without Ray.

Their export by each role's process, through a real head's metrics port into a real Prometheus, and the
Grafana dashboard's queries, are checked end to end in ``test_submit.py``.
"""

from __future__ import annotations

import math

import pytest
import ray

from opd.metrics import ROLE_SPECS, RoleMetrics
from opd.monitor.ray_metrics import SPECS, RayMetricsSink, metric_values


def test_metric_values_keep_known_finite_keys():
    got = metric_values({"reward": 0.5, "teacher_kl": math.nan, "entropy": None, "loss": 1.0,
                         "weight_version": 3})
    assert [(s.name, s.role, v) for s, v in got] == [("opd_reward", "verifier", 0.5),
                                                     ("opd_weight_version", "learner", 3.0)]
    names = [s.name for s in SPECS]
    assert len(set(names)) == len(names) and all(n.startswith("opd_") for n in names)
    for key in ("accuracy", "rollout_tokens_per_s", "score_tokens_per_s", "train_tokens_per_s",
                "step_seconds", "verifier_failures", "eval_accuracy"):
        assert key in {s.key for s in SPECS}


def test_sink_is_inert_without_ray(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    sink = RayMetricsSink("job", flush_on_close=True)
    sink.log(0, {"reward": 1.0, "verifier_failures": 2.0})
    sink.start(0)
    sink.held_out({"eval_accuracy": 0.5})
    sink.close()  # nothing recorded, nothing to flush, no wait
    assert sink._gauges._made == {} and sink._last_record is None
    role = RoleMetrics("rollout")
    role.record(tokens=3.0)
    assert role._gauges._made == {} and role.job is None


def test_role_series_belong_to_one_role_each_and_unknown_roles_are_refused():
    names = [s.name for s in ROLE_SPECS]
    assert len(set(names)) == len(names) and not set(names) & {s.name for s in SPECS}
    assert {s.role for s in ROLE_SPECS} == {"rollout", "teacher", "learner", "verifier"}
    with pytest.raises(ValueError, match="no opd series for role 'driver'"):
        RoleMetrics("driver")
