"""``opd report RUN_DIR``: PNG curves and a markdown summary of a run's ``metrics.jsonl`` and
``summary.json``.

    opd report runs/demo                              # writes runs/demo/report/report.md and its PNGs
    python -m opd.monitor.report runs/demo --out /tmp/demo-report

Works on a finished run and on one still going or killed: ``summary.json`` may be absent, values may be null,
and torn lines of ``metrics.jsonl`` (a driver killed mid-write) are skipped and counted. matplotlib (``dev``
extra) is imported only here, and without pyplot, so no global backend is touched.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Curves drawn together because they share a scale; every other numeric key goes into one grid of small
# panels.
PANELS = (
    ("reward_accuracy", "reward and accuracy", ("reward", "accuracy", "eval_accuracy")),
    ("teacher_kl", "teacher KL (nats/token)", ("teacher_kl", "eval_teacher_kl")),
    ("entropy", "student entropy (nats/token)", ("entropy",)),
    ("loss", "loss", ("loss",)),
    ("grad_norm", "gradient norm", ("grad_norm",)),
    ("throughput", "tokens per second", ("rollout_tokens_per_s", "score_tokens_per_s", "train_tokens_per_s")),
    ("step_seconds", "seconds per step", ("step_seconds",)),
    ("verifier_failures", "verifier failures per step", ("verifier_failures",)),
)
GROUPED = tuple(k for _, _, keys in PANELS for k in keys)
SUMMARY_ORDER = ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "eval_prompts",
                 "steps", "wall_seconds")


class ReportError(ValueError):
    """Input the report cannot be made from; the message says what and where."""


@dataclass
class RunLog:
    records: list[dict]  # one per step, sorted by step
    skipped: list[int] = field(default_factory=list)  # 1-based numbers of unreadable lines
    summary: dict | None = None
    notes: list[str] = field(default_factory=list)  # problems worth telling, none fatal

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``key`` where it is a finite number (null and missing values left out)."""
        pairs = [(r["step"], float(r[key])) for r in self.records if _is_number(r.get(key))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def numeric_keys(self) -> list[str]:
        """Keys with at least one finite number: the panels' keys in panel order, then the rest as first
        seen."""
        keys = dict.fromkeys(k for r in self.records for k, v in r.items() if k != "step" and _is_number(v))
        return [k for k in GROUPED if k in keys] + [k for k in keys if k not in GROUPED]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_run(run_dir: Path) -> RunLog:
    if not run_dir.is_dir():
        raise ReportError(f"run directory {str(run_dir)!r} does not exist" if not run_dir.exists()
                          else f"{str(run_dir)!r} is not a directory")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"no metrics.jsonl in {str(run_dir)!r}: is this a run.output_dir?")
    by_step: dict[int, dict] = {}
    skipped = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            skipped.append(number)
            continue
        # a step logged twice keeps its last record, as a resume would
        by_step[step] = {**record, "step": step}
    if not by_step:
        raise ReportError(f"{str(path)!r} has no readable records ({len(skipped)} unreadable lines)")
    log = RunLog(records=[by_step[s] for s in sorted(by_step)], skipped=skipped)
    if skipped:
        log.notes.append(f"skipped {len(skipped)} unreadable line(s) of metrics.jsonl "
                         f"(line {_numbers(skipped)}); "
                         "a torn last line is what a killed driver leaves")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError as e:
            summary = e
        if isinstance(summary, dict):
            log.summary = summary
        else:  # the run's metrics are still worth a report
            log.notes.append(f"summary.json is not a JSON object ({summary}); its figures are left out")
    return log


def _numbers(lines: list[int], shown: int = 5) -> str:
    text = ", ".join(map(str, lines[:shown]))
    return text + (f" and {len(lines) - shown} more" if len(lines) > shown else "")


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ReportError("the curves need matplotlib, which is not installed: pip install 'matplotlib>=3.8' "
                          "(it is in the dev extra: pip install -e '.[dev]')") from e
    return Figure


def plot_panels(log: RunLog, out_dir: Path, Figure) -> list[tuple[str, Path]]:
    """One PNG per panel that has data, then one grid of the remaining metrics (``Figure``: matplotlib's).

    Returns (title, path) pairs in drawing order.
    """
    present = log.numeric_keys()
    written = []
    for name, title, keys in PANELS:
        curves = [(k, *log.series(k)) for k in keys if k in present]
        if not curves:
            continue
        # a Figure alone renders with Agg: no pyplot state
        fig = Figure(figsize=(7, 3.5), layout="constrained")
        _draw(fig.add_subplot(), title, curves)
        written.append((title, _save(fig, out_dir / f"{name}.png")))
    others = [k for k in present if k not in GROUPED]
    if others:
        cols = min(3, len(others))
        rows = math.ceil(len(others) / cols)
        fig = Figure(figsize=(4 * cols, 2.6 * rows), layout="constrained")
        for i, key in enumerate(others, start=1):
            _draw(fig.add_subplot(rows, cols, i), key, [(key, *log.series(key))])
        written.append(("other metrics", _save(fig, out_dir / "other_metrics.png")))
    return written


def _draw(ax, title: str, curves: list[tuple[str, list[int], list[float]]]) -> None:
    for i, (key, steps, values) in enumerate(curves):
        # Sparse series (eval_accuracy every eval.every steps) need markers to be seen at all; line styles
        # keep equal curves (reward and accuracy under a 0/1 verifier) both visible.
        ax.plot(steps, values, linestyle=("-", "--", ":")[i % 3], marker="o" if len(steps) <= 30 else None,
                markersize=3, label=key)
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def summary_lines(summary: dict | None) -> list[str]:
    if summary is None:
        return ["No readable `summary.json`: the run has not finished, or stopped before its final "
                "evaluation.", ""]
    keys = [k for k in SUMMARY_ORDER if k in summary] + [k for k in summary if k not in SUMMARY_ORDER]
    lines = ["| figure | value |", "|---|---|", *(f"| {k} | {_fmt(summary[k])} |" for k in keys), ""]
    teacher, before, after = (summary.get(k) for k in SUMMARY_ORDER[:3])
    if all(_is_number(v) for v in (before, after, teacher)):
        lines.append(f"Held-out accuracy of the student: **{before:.1%} → {after:.1%}** "
                     f"(teacher {teacher:.1%}).")
        lines.append("")
    return lines


def metric_table(log: RunLog) -> list[str]:
    lines = ["| metric | points | first | last | min | max |", "|---|---|---|---|---|---|"]
    for key in log.numeric_keys():
        _, values = log.series(key)
        lines.append(f"| {key} | {len(values)} | {_fmt(values[0])} | {_fmt(values[-1])} "
                     f"| {_fmt(min(values))} | {_fmt(max(values))} |")
    return lines + [""]


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write ``report.md`` and its PNG curves into ``out_dir`` (default ``RUN_DIR/report``); returns
    report.md's path.

    Raises ReportError on input it cannot use (missing run dir, no readable metrics, matplotlib absent).
    """
    return _write_report(Path(run_dir), out_dir)[0]


def _write_report(run_dir: Path, out_dir: Path | None) -> tuple[Path, RunLog]:
    log = read_run(run_dir)
    Figure = _figure_class()  # before anything is written, so a missing matplotlib leaves no empty directory
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plot_panels(log, out_dir, Figure)
    steps = [r["step"] for r in log.records]
    lines = [f"# Run report: {run_dir.resolve().name}", "",
             f"`{run_dir}`: {len(steps)} step records, steps {steps[0]}–{steps[-1]}.", ""]
    lines += [f"> {note}" for note in log.notes] + ([""] if log.notes else [])
    lines += ["## Summary", "", *summary_lines(log.summary)]
    lines += ["## Metrics", "", *metric_table(log)]
    lines += ["## Curves", ""]
    for title, path in pngs:
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report, log


def main_report(run_dir: str, out: str | None) -> int:
    """Entry point of ``opd report``: 0 and the report's path on stdout; 2 and a message on stderr on bad
    input."""
    try:
        report, log = _write_report(Path(run_dir), Path(out) if out else None)
    except ReportError as e:
        print(f"opd report: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable input or an output directory that cannot be written; names the path
        print(f"opd report: {e}", file=sys.stderr)
        return 1
    for note in log.notes:
        print(f"opd report: {note}", file=sys.stderr)
    print(report)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m opd.monitor.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir",
                        help="a run.output_dir holding metrics.jsonl (and summary.json when finished)")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    cli = parser.parse_args()
    sys.exit(main_report(cli.run_dir, cli.out))
