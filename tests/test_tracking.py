"""W&B (offline) and MLflow (file store) sinks driven by a real ``MetricsLogger``; no network.

W&B's public API is online-only, so the offline run is read back from its ``.wandb`` transaction log: a
LevelDB-style record log of ``wandb_internal_pb2.Record`` protobufs, parsed here with wandb's own protobuf
classes.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import pytest

from opd.config import ConfigError, TrackingConfig
from opd.monitor.sinks import MetricsLogger
from opd.monitor.tracking import STATE_FILE

CONFIG = {"algorithm": "opd", "trainer": {"lr": 1e-4, "total_steps": 4}, "verifiers": ["exact_answer"]}


def _steps(logger: MetricsLogger, steps) -> None:
    for s in steps:
        # A None, a NaN and a string ride along: the trackers skip them, metrics.jsonl keeps them.
        logger.log(s, {"reward": s / 10, "teacher_kl": float("nan"), "entropy": None, "note": "x",
                       "reward/path/v.py:fn": 1.0})


def _wandb_runs(run_dir: Path) -> list[dict]:
    """Each offline run directory, oldest first: its run id, config keys and history rows."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"id": None, "config": set(), "history": []}
        for raw in _wandb_records(path.read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run["id"] = rec.run.run_id
                run["config"] |= {item.key for item in rec.run.config.update}
            elif kind == "config":
                run["config"] |= {item.key for item in rec.config.update}
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in rec.history.item})
        out.append(run)
    return out


def _wandb_records(data: bytes, block: int = 32768):
    # File header ":W&B" + magic + version (7 bytes); then 32 KiB blocks of chunks, each crc32(4) len(2)
    # type(1).
    assert data[:4] == b":W&B"
    pos, partial = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind in (2, 3):  # first, middle
            partial += chunk
        elif kind == 4:  # last
            yield partial + chunk
            partial = b""


def _mlflow(run_dir: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]
    return MlflowClient(tracking_uri=state["tracking_uri"]), state["run_id"]


def test_wandb_and_mlflow_offline_with_resume(tmp_path):
    run_dir = tmp_path / "run"
    tracking = TrackingConfig(wandb=True, mlflow=True, mlflow_experiment="opd-test")
    logger = MetricsLogger(run_dir, 4, progress=False, job="job", tracking=tracking, config=CONFIG,
                           run_name="first")
    _steps(logger, range(3))
    logger.close()

    state = json.loads((run_dir / STATE_FILE).read_text())
    # the default file store
    assert state["mlflow"]["tracking_uri"] == (run_dir / "mlruns").resolve().as_uri()
    [wb] = _wandb_runs(run_dir)
    assert wb["id"] == state["wandb"]["id"]
    assert {"algorithm", "trainer", "verifiers"} <= wb["config"]
    assert [(h["_step"], h["reward"]) for h in wb["history"]] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert not any("teacher_kl" in h or "entropy" in h or "note" in h for h in wb["history"])
    client, run_id = _mlflow(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params["trainer.lr"] == "0.0001" and run.data.params["verifiers"] == '["exact_answer"]'
    assert [(m.step, m.value)
            for m in client.get_metric_history(run_id, "reward")] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    # file store: no '/', ':'
    assert [m.step for m in client.get_metric_history(run_id, "reward.path.v.py_fn")] == [0, 1, 2]
    assert client.get_metric_history(run_id, "teacher_kl") == []

    # Resume from a checkpoint at step 2 with a changed config: both trackers append to the same runs.
    resumed_cfg = {**CONFIG, "trainer": {"lr": 1e-4, "total_steps": 6}}
    logger = MetricsLogger(run_dir, 6, start_step=2, progress=False, job="job", tracking=tracking,
                           config=resumed_cfg, run_name="first")
    _steps(logger, range(2, 5))
    logger.close()

    assert json.loads((run_dir / STATE_FILE).read_text()) == state
    # offline: one directory per attempt, one run id (`wandb sync` merges)
    first, second = _wandb_runs(run_dir)
    assert second["id"] == first["id"]
    assert [h["_step"] for h in second["history"]] == [2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "reward")]
    assert sorted(set(history)) == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    # params are immutable: the first value
    assert client.get_run(run_id).data.params["trainer.total_steps"] == "4"
    assert (json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path))).read_text())
            == resumed_cfg)
    assert ([json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
            == [0, 1, 2, 3, 4])

    # A fresh (not resumed) logger in the same directory starts a new MLflow run.
    logger = MetricsLogger(run_dir, 1, progress=False,
                           tracking=TrackingConfig(mlflow=True, mlflow_experiment="opd-test"))
    logger.close()
    assert json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"] != run_id


def test_tracker_that_cannot_start_names_the_key(tmp_path):
    bad = TrackingConfig(mlflow=True, mlflow_tracking_uri="nosuchscheme://host/x")
    with pytest.raises(ConfigError, match=r"^tracking\.mlflow: could not start the tracker"):
        MetricsLogger(tmp_path / "run", 2, progress=False, tracking=bad)
    assert not (tmp_path / "run" / STATE_FILE).exists()


def test_tracker_failing_mid_run_only_warns(tmp_path, caplog):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, 3, progress=False, tracking=TrackingConfig(mlflow=True))
    _steps(logger, [0])
    shutil.rmtree(run_dir / "mlruns")  # the store vanishes under the running tracker
    with caplog.at_level(logging.WARNING, logger="opd.tracking"):
        _steps(logger, [1, 2])
        logger.close()
    assert ([json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
            == [0, 1, 2])
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("logging step 1 failed" in w for w in warnings) == 1  # warned once, not once per step
    assert any("2 step(s) could not be logged" in w for w in warnings)


def test_no_tracking_configured_starts_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, 1, progress=False, tracking=TrackingConfig())
    _steps(logger, [0])
    logger.close()
    assert not (tmp_path / STATE_FILE).exists() and not (tmp_path / "wandb").exists()
