"""opd's Grafana dashboard, built from the series table in ``opd.monitor.ray_metrics`` so the two cannot
drift.

    python -m opd.monitor.grafana > docker/grafana/opd.json

``docker/compose.yaml`` provisions the file next to Ray's own dashboards (which the Ray dashboard's Metrics
tab embeds); ``tests/test_submit.py`` checks the committed file is this module's output and that every query
in it returns data from a real Prometheus scraping a real job.
"""

from __future__ import annotations

import json
import sys

from opd.agents.env import STOP_REASONS
from opd.metrics import ROLE_SPECS, MetricSpec
from opd.monitor.ray_metrics import SPECS, STEP

UID = "opd-run"
_BY_NAME = {s.name: s for s in (*SPECS, STEP, *ROLE_SPECS)}

# (row, panel title, unit, [series]); a role series is drawn per replica (rollout worker, rank, teacher,
# verifier)
PANELS = (
    ("Learning", "Reward and accuracy (step)", "percentunit", ["opd_reward", "opd_accuracy"]),
    ("Learning", "Teacher KL (nats/token)", "none", ["opd_teacher_kl", "opd_eval_teacher_kl"]),
    ("Learning", "Held-out accuracy", "percentunit", ["opd_eval_accuracy"]),
    ("Learning", "Student entropy (nats/token)", "none", ["opd_entropy"]),
    ("Progress", "Steps done", "none", ["opd_step"]),
    ("Progress", "Step time", "s", ["opd_step_seconds"]),
    ("Progress", "Weight versions", "none",
     ["opd_weight_version", "opd_learner_weight_version", "opd_rollout_worker_weight_version"]),
    ("Throughput", "Rollout tokens/s", "none",
     ["opd_rollout_tokens_per_s", "opd_rollout_worker_tokens_per_s"]),
    ("Throughput", "Teacher tokens/s", "none", ["opd_score_tokens_per_s", "opd_teacher_worker_tokens_per_s"]),
    ("Throughput", "Learner tokens/s", "none", ["opd_train_tokens_per_s", "opd_learner_tokens_per_s"]),
    ("Throughput", "Tokens so far", "none",
     ["opd_rollout_worker_tokens", "opd_teacher_worker_tokens", "opd_learner_tokens"]),
    ("Throughput", "Learner peak activations", "mbytes", ["opd_learner_activation_mib"]),
    ("Faults", "Verifier failures (rows so far)", "none",
     ["opd_verifier_failures", "opd_verifier_failed_rows"]),
    ("Faults", "Verifier rows scored", "none", ["opd_verifier_rows"]),
    ("Faults", "Verifier call time", "s", ["opd_verifier_seconds"]),
    ("Faults", "Rollout workers replaced", "none", ["opd_rollout_worker_restarts"]),
    ("Agents", "Turns and tool calls per episode", "none",
     ["opd_episode_turns", "opd_episode_tool_calls", "opd_episode_tool_errors", "opd_episode_tool_timeouts"]),
    ("Agents", "Why episodes stopped (share)", "percentunit",
     [f"opd_stop_{r}" for r in STOP_REASONS] + ["opd_drift_rate"]),
    ("Agents", "Teacher KL by segment (nats/token)", "none",
     ["opd_teacher_kl_tool_call", "opd_teacher_kl_after_observation", "opd_teacher_kl_answer"]),
    ("Agents", "Held-out episodes: tool-call rate and turns", "none",
     ["opd_eval_tool_call_rate", "opd_eval_turns"]),
)


def query(spec: MetricSpec) -> tuple[str, str]:
    """(PromQL, legend) of one series. ``max by`` folds the labels Ray adds (WorkerId, NodeAddress,
    SessionName): a replaced actor reports under a new WorkerId, and the dashboard means the role, not the
    process."""
    per_replica = spec in ROLE_SPECS
    keys = "run, replica" if per_replica else "run"
    legend = "{{run}} " + spec.name.removeprefix("opd_") + (" {{replica}}" if per_replica else "")
    return f'max by ({keys}) (ray_{spec.name}{{run=~"$run"}})', legend


def dashboard() -> dict:
    panels, y = [], 0
    for i, (row, title, unit, names) in enumerate(PANELS):
        if i == 0 or PANELS[i - 1][0] != row:
            panels.append({"type": "row", "title": row, "collapsed": False, "id": len(panels) + 1,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            y, col = y + 1, 0
        targets = [{"expr": expr, "legendFormat": legend, "refId": chr(65 + j),
                    "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                   for j, (expr, legend) in enumerate(query(_BY_NAME[n]) for n in names)]
        panels.append({
            "type": "timeseries", "title": title, "id": len(panels) + 1,
            "description": "; ".join(f"{n}: {_BY_NAME[n].description}" for n in names),
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 8, "x": 8 * col, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}},
            "targets": targets,
        })
        col = (col + 1) % 3
        y += 8 if col == 0 else 0
    return {
        "uid": UID, "title": "opd runs", "tags": ["opd", "ray"], "schemaVersion": 39, "version": 1,
        "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {"selected": False, "text": "Prometheus", "value": "Prometheus"}},
            {"name": "run", "label": "Run (run.name)", "type": "query", "refresh": 2, "multi": True,
             "includeAll": True, "allValue": ".+",
             "current": {"selected": True, "text": "All", "value": "$__all"},
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "definition": "label_values(ray_opd_step, run)",
             "query": {"query": "label_values(ray_opd_step, run)", "refId": "run"}},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
