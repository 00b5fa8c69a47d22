"""The driver's supply of rollout batches, synchronous or running ahead of the learner by a bounded number of steps.

With ``rollout.max_staleness = k > 0`` the rollout workers generate the batches of steps n+1..n+k while the teacher
scores and the learner trains step n. A worker runs its calls in order, so a weight sync queued after those
generations reaches the engine after them: every batch is at most k weight versions behind the learner, and the
policy-gradient objectives correct for it with their truncated importance weight against the sampler's log-probs.

Batches still in flight at a checkpoint are finished and stored with it, so a resumed run trains on exactly the
samples the uninterrupted run would have.
"""

from __future__ import annotations

import pickle
from collections import deque
from pathlib import Path

import ray

from opd.data import PromptSource
from opd.types import RolloutBatch

IN_FLIGHT_FILE = "in_flight_rollouts.pkl"


def split_even(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal chunks: keeps each prompt's G samples on one worker and the batch in order."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class Pending:
    """One step's generation, launched on the workers and not yet collected."""

    def __init__(self, step: int, refs: list, group_size: int):
        self.step, self.refs, self.group_size = step, refs, group_size

    def result(self) -> RolloutBatch:
        results = ray.get(self.refs)
        samples = [s for part, _ in results for s in part]
        batch = RolloutBatch(self.step, samples, self.group_size, samples[0].weight_version, max(sec for _, sec in results))
        batch.validate()
        return batch


def launch(workers: list, draws: list, step: int, rollout_cfg, seed: int) -> Pending:
    r = rollout_cfg
    chunks = [c for c in split_even(draws, len(workers)) if c]
    refs = [
        w.generate.remote(c, n=r.group_size, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens, seed=seed)
        for w, c in zip(workers, chunks, strict=False)
    ]
    return Pending(step, refs, r.group_size)


class RolloutStream:
    def __init__(self, workers: list, data: PromptSource, rollout_cfg, seed: int, ready: list[RolloutBatch] | None = None):
        self.workers, self.data, self.cfg, self.seed = workers, data, rollout_cfg, seed
        self.queue: deque[Pending | RolloutBatch] = deque(ready or [])

    def _next_step(self, step: int) -> int:
        return self.queue[-1].step + 1 if self.queue else step

    def take(self, step: int, last_step: int) -> RolloutBatch:
        """The batch for ``step``, after launching generation up to ``max_staleness`` steps ahead (never past the run)."""
        while self._next_step(step) <= min(step + self.cfg.max_staleness, last_step - 1):
            s = self._next_step(step)
            self.queue.append(launch(self.workers, self.data.next_batch(self.cfg.prompts_per_step), s, self.cfg, self.seed))
        head = self.queue.popleft()
        if head.step != step:
            raise RuntimeError(f"rollout stream out of order: wanted step {step}, next batch is step {head.step}")
        return head if isinstance(head, RolloutBatch) else head.result()

    def save_in_flight(self, directory: str) -> None:
        """Finish the batches launched ahead and store them beside a checkpoint (they are generated already, or
        about to be: the worker runs them before the weight sync that preceded this save)."""
        done = [b if isinstance(b, RolloutBatch) else b.result() for b in self.queue]
        self.queue = deque(done)
        if done:
            (Path(directory) / IN_FLIGHT_FILE).write_bytes(pickle.dumps(done))


def load_in_flight(checkpoint: Path | None) -> list[RolloutBatch]:
    path = checkpoint / IN_FLIGHT_FILE if checkpoint else None
    return pickle.loads(path.read_bytes()) if path and path.is_file() else []
