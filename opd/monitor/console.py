"""What a run prints per step: a tqdm bar on a terminal; elsewhere (a Ray job's log, CI, ``nohup``) one
compact line
per step, or one every ``min_interval_s`` for fast steps, with held-out results on lines of their own:

    step 12/60 | reward 0.0625 | acc 6.2% | teacher_kl 0.952 | 6.41 s/step | 198 tok/s | ETA 5m08s
    eval step 20/60 | accuracy 8.7% | teacher_kl 0.622
"""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

BAR_KEYS = (("reward", "reward"), ("accuracy", "acc"), ("teacher_kl", "kl"), ("entropy", "ent"),
            ("step_seconds", "s/step"))


def _fmt(key: str, value: float) -> str:
    if "accuracy" in key:
        return f"{value:.1%}"
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    m, s = divmod(max(0, round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def eval_line(label: str, metrics: dict) -> str:
    parts = [f"eval {label}"]
    if metrics.get("eval_accuracy") is not None:
        parts.append(f"accuracy {metrics['eval_accuracy']:.1%}")
    if metrics.get("eval_teacher_kl") is not None:
        parts.append(f"teacher_kl {metrics['eval_teacher_kl']:.3g}")
    return " | ".join(parts)


class Console:
    """``bar``: tqdm (a terminal and progress wanted); otherwise lines on stdout, flushed at once so a job's
    log shows them as they happen."""

    def __init__(self, total: int, start: int, bar: bool | None = None, min_interval_s: float = 0.0,
                 out=None):
        self.out = out or sys.stdout
        self.bar_on = self.out.isatty() if bar is None else bar
        self.total, self.start, self.min_interval_s = total, start, min_interval_s
        self.bar = tqdm(total=total, initial=start, desc="opd", dynamic_ncols=True) if self.bar_on else None
        self.t0, self.last = time.monotonic(), -math.inf

    def step(self, step: int, metrics: dict) -> None:
        if self.bar is not None:
            shown = {label: f"{metrics[k]:.3g}" for k, label in BAR_KEYS if metrics.get(k) is not None}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
            return
        now, done = time.monotonic(), step + 1
        if done == self.total or now - self.last >= self.min_interval_s:
            self.last = now
            self._print(self.line(done, metrics, now))
        if metrics.get("eval_accuracy") is not None:
            self._print(eval_line(f"step {done}/{self.total}", metrics))

    def line(self, done: int, metrics: dict, now: float) -> str:
        parts = [f"step {done}/{self.total}"]
        for key, label in (("reward", "reward"), ("accuracy", "acc"), ("teacher_kl", "teacher_kl")):
            if metrics.get(key) is not None:
                parts.append(f"{label} {_fmt(key, metrics[key])}")
        if metrics.get("step_seconds") is not None:
            parts.append(f"{metrics['step_seconds']:.3g} s/step")
        if metrics.get("rollout_tokens_per_s") is not None:
            parts.append(f"{metrics['rollout_tokens_per_s']:.0f} tok/s")
        per_step = (now - self.t0) / max(1, done - self.start)
        parts.append(f"ETA {_duration(per_step * (self.total - done))}")
        return " | ".join(parts)

    def note(self, text: str) -> None:
        """A line of its own (held-out results before and after training); on a terminal, above the bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            self._print(text)

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
