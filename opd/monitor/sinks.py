"""Where per-step metrics go: ``metrics.jsonl`` (one JSON object per step), TensorBoard events, the console."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

CONSOLE_KEYS = (("reward", "reward"), ("accuracy", "acc"), ("teacher_kl", "kl"), ("entropy", "ent"), ("step_seconds", "s/step"))


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="opd", disable=not progress, dynamic_ncols=True)
        if start_step:
            self._truncate_after(start_step)

    def _truncate_after(self, step: int) -> None:
        # On resume, drop lines of steps that ran after the checkpoint so the log has each step exactly once.
        if not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", -1) < step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        shown = {label: f"{metrics[k]:.3g}" for k, label in CONSOLE_KEYS if k in metrics and metrics[k] is not None}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.tb.flush()
        self.tb.close()
