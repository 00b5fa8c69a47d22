"""``opd report``: curves and markdown from a synthetic run directory (no Ray, no models; about a second).

    .venv/bin/pytest -q tests/test_report.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from opd.monitor.report import main_report, read_run, write_report

pytest.importorskip("matplotlib", reason="matplotlib (dev extra) draws the curves")

STEPS = 12
SUMMARY = {"teacher_accuracy": 0.85, "student_accuracy_before": 0.16, "student_accuracy_after": 0.59,
           "eval_prompts": 500, "steps": STEPS, "wall_seconds": 227.0}


def _record(step: int) -> dict:
    record = {
        "step": step,
        "reward": 0.1 + 0.05 * step,
        "accuracy": 0.1 + 0.05 * step,
        "teacher_kl": 5.0 - 0.25 * step,
        "entropy": 1.0,
        "loss": None if step == 3 else 0.9 - 0.01 * step,  # the logger writes a non-finite value as null
        "grad_norm": 2.0,
        "step_seconds": 0.65,
        "rollout_tokens_per_s": 5000.0 + step,
        "train_tokens_per_s": 1400.0,
        "verifier_failures": 1 if step == 7 else 0,
        "probe_max_diff": 1e-7,  # no panel of its own: lands in the grid of other metrics
    }
    if step % 5 == 0:
        record["eval_accuracy"] = 0.2 + 0.01 * step
    return record


def _run_dir(tmp_path: Path, summary: bool = True, tail: str = "") -> Path:
    run = tmp_path / "run"
    run.mkdir()
    lines = "".join(json.dumps(_record(s)) + "\n" for s in range(STEPS))
    (run / "metrics.jsonl").write_text(lines + tail)
    if summary:
        (run / "summary.json").write_text(json.dumps(SUMMARY))
    return run


def _table_row(report: str, key: str) -> list[str]:
    row = next(ln for ln in report.splitlines() if ln.startswith(f"| {key} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_report_has_summary_table_and_linked_curves(tmp_path):
    run = _run_dir(tmp_path)
    path = write_report(run)
    assert path == run / "report" / "report.md"
    report = path.read_text()

    assert "| teacher_accuracy | 0.85 |" in report and "| wall_seconds | 227 |" in report
    assert "16.0% → 59.0%" in report
    # metric | points | first | last | min | max
    assert _table_row(report, "teacher_kl") == ["teacher_kl", "12", "5", "2.25", "2.25", "5"]
    assert _table_row(report, "loss")[1] == "11"  # the null step is left out, not drawn as zero
    assert _table_row(report, "eval_accuracy")[1:4] == ["3", "0.2", "0.3"]

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"reward_accuracy.png", "teacher_kl.png", "loss.png", "throughput.png",
            "other_metrics.png"} <= set(links)
    assert "score_tokens_per_s" not in report  # absent keys make no rows
    for link in links:
        png = path.parent / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link


def test_unfinished_run_with_a_torn_last_line(tmp_path, capsys):
    run = _run_dir(tmp_path, summary=False, tail='{"step": 12, "reward": 0.')  # a driver killed mid-write
    out = tmp_path / "elsewhere"
    assert main_report(str(run), str(out)) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "report.md")
    assert "skipped 1 unreadable line(s)" in captured.err and "line 13" in captured.err

    report = (out / "report.md").read_text()
    assert "No readable `summary.json`" in report
    assert "skipped 1 unreadable line(s)" in report
    assert "12 step records, steps 0–11" in report
    assert not (run / "report").exists()


def test_a_step_logged_twice_keeps_its_last_record(tmp_path):
    run = _run_dir(tmp_path, tail=json.dumps({**_record(11), "teacher_kl": 9.0}) + "\n")
    log = read_run(run)
    assert len(log.records) == STEPS and log.records[-1]["teacher_kl"] == 9.0


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_metrics", "no metrics.jsonl"),
    ("all_torn", "no readable records"),
    ("a_file", "is not a directory"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, case, message):
    run = tmp_path / "run"
    if case == "no_metrics":
        run.mkdir()
    elif case == "all_torn":
        run.mkdir()
        (run / "metrics.jsonl").write_text('{"step": 0, "rew\nnot json\n')
    elif case == "a_file":
        run.write_text("")
    assert main_report(str(run), None) == 2
    err = capsys.readouterr().err
    assert err.startswith("opd report: ") and message in err and "Traceback" not in err


def test_missing_matplotlib_is_named_and_writes_nothing(tmp_path, capsys, monkeypatch):
    run = _run_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail as if not installed
    assert main_report(str(run), None) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not (run / "report").exists()
