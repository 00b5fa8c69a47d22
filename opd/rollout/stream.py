"""The driver's supply of rollout batches, synchronous or running ahead of the learner by a bounded number of
steps.

A batch is generated in chunks: each worker's share of the draws, cut into generation calls of
``rollout.chunk_prompts`` prompts (0: one call per worker). Every chunk is scored as soon as it is generated,
off the driver's main thread: it goes to the teacher actor the moment its generation ends (Ray starts the
scoring task when the samples' ObjectRef resolves), and a background thread runs the verifiers on each chunk
as it arrives, so the teacher scores chunk i while the worker generates chunk i+1.

With ``rollout.max_staleness = k > 0`` the rollout workers generate the batches of steps n+1..n+k while the
learner trains step n. A worker runs its calls in order, so a weight sync queued after those generations
reaches the engine after them: every batch is at most k weight versions behind the learner, and the
policy-gradient objectives correct for it with their truncated importance weight against the sampler's
log-probs.

Batches still in flight at a checkpoint are finished, scored and stored with it, so a resumed run trains on
exactly the samples (and teacher scores) the uninterrupted run would have.

The stream hands out nothing generated at unchecked weights: ``take`` waits for the last weight sync's probe
(``RolloutPool.checked``) before it returns a batch, and ``save_in_flight`` before it stores any, so a failed
sync stops the run there and a checkpoint only ever follows a checked sync.
"""

from __future__ import annotations

import pickle
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from opd.data import PromptSource
from opd.rollout.pool import Chunk, RolloutPool
from opd.types import Prompt, Rewards, RolloutBatch, Sample, ScoredChunk, TeacherScores

if TYPE_CHECKING:
    from ray import ObjectRef

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


def pieces(share: list, size: int) -> list[list]:
    """A worker's share as generation calls of ``size`` draws (``rollout.chunk_prompts``; 0: one call)."""
    if not share:
        return []
    return [share[i : i + size] for i in range(0, len(share), size)] if size else [share]


@dataclass
class Scored:
    """A step's batch with its verifier rewards and teacher scores (both None from a stream without a
    scorer)."""

    batch: RolloutBatch
    rewards: Rewards | None = None
    scores: TeacherScores | None = None
    # Set by ``take``: the max probe difference of the weight sync checked before the batch was handed out
    # (the check of the weights the step starts from); None without a sync.
    probe_max_diff: float | None = None
    # rollout.dynamic_sampling: groups generated for this step (extra rounds included) and extra rounds drawn
    generated_groups: int | None = None
    resample_rounds: int = 0

    @property
    def step(self) -> int:
        return self.batch.step

    def groups(self, keep: list[int]) -> Scored:
        """The batch cut down to the groups ``keep`` (indices of ``group_size`` consecutive samples)."""
        g = self.batch.group_size
        idx = [i for k in keep for i in range(k * g, (k + 1) * g)]
        return replace(self, batch=replace(self.batch, samples=[self.batch.samples[i] for i in idx]),
                       rewards=self.rewards.rows(idx),
                       scores=None if self.scores is None else self.scores.rows(idx))

    @staticmethod
    def concat(parts: list[Scored]) -> Scored:
        first = parts[0]
        batch = replace(first.batch, samples=[s for p in parts for s in p.batch.samples],
                        generate_seconds=sum(p.batch.generate_seconds for p in parts))
        scores = None if first.scores is None else TeacherScores.concat([p.scores for p in parts])
        return replace(first, batch=batch, rewards=Rewards.concat([p.rewards for p in parts]), scores=scores)


class Scorer(Protocol):
    """What the stream needs to score batches as they are generated; the driver hands one down
    (``opd.steps.ChunkScorer``), so the rollout layer never imports the roles that score."""

    def chain(self, draws: list[tuple[Prompt, int]], samples_ref: ObjectRef) -> ObjectRef | None:
        """When a chunk is issued: a teacher call on the generation's ObjectRef (it starts the moment
        generation ends), or None to score the chunk when it arrives."""
        ...

    def chunk(self, samples: list[Sample], teacher_ref: ObjectRef | None) -> ScoredChunk:
        """On the stream's thread as each chunk arrives: verify it (and start its teacher scoring if not
        chained)."""
        ...

    def merge(self, batch: RolloutBatch, parts: list[ScoredChunk]) -> Scored:
        """The batch's chunks as one scored batch, in batch order (waits for the teacher scores)."""
        ...


def score_whole(scorer: Scorer, batch: RolloutBatch) -> Scored:
    """A batch scored as one chunk, all at once."""
    return scorer.merge(batch, [scorer.chunk(batch.samples, None)])


class Pending:
    """One step's generation, launched on the workers and not yet collected (and, with a scorer, being
    scored)."""

    def __init__(self, step: int, pool: RolloutPool, chunks: list[Chunk], group_size: int,
                 scorer: Scorer | None = None):
        self.step, self.pool, self.chunks, self.group_size, self.scorer = (
            step, pool, chunks, group_size, scorer)
        self.future: Future | None = None
        if scorer is not None:
            self.future = Future()
            threading.Thread(target=self._score, name=f"opd-score-step-{step}", daemon=True).start()

    def _collect(self, each=None) -> RolloutBatch:
        samples, seconds = [], {}
        for chunk in self.chunks:
            part, sec, teacher = self.pool.collect(chunk)
            samples += part
            # a worker runs its chunks one after another
            seconds[chunk.slot] = seconds.get(chunk.slot, 0.0) + sec
            if each is not None:
                each(part, teacher)
        batch = RolloutBatch(self.step, samples, self.group_size, samples[0].weight_version,
                             max(seconds.values()))
        batch.validate()
        return batch

    def result(self) -> RolloutBatch:
        return self._collect()

    def _score(self) -> None:
        try:
            # each chunk verified as it arrives, while later chunks still generate
            parts: list[ScoredChunk] = []
            batch = self._collect(lambda samples, teacher: parts.append(self.scorer.chunk(samples, teacher)))
            self.future.set_result(self.scorer.merge(batch, parts))
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread, which raises it
            self.future.set_exception(e)

    def scored(self) -> Scored:
        return self.future.result() if self.future is not None else Scored(self.result())


def launch(workers: list, draws: list, step: int, rollout_cfg, seed: int,
           scorer: Scorer | None = None, episodes: tuple | None = None) -> Pending:
    """``episodes``: ``opd.agents.episode_setup`` of a multi-turn job (each draw an episode)."""
    r = rollout_cfg
    pool = workers if isinstance(workers, RolloutPool) else RolloutPool(workers)
    kwargs = {"n": r.group_size, "temperature": r.temperature, "top_p": r.top_p,
              "max_tokens": r.max_new_tokens, "seed": seed, "episodes": episodes}
    chain = scorer.chain if scorer is not None else None
    chunks = [Chunk(slot, piece, kwargs, chain)
              for slot, share in enumerate(split_even(draws, len(pool)))
              for piece in pieces(share, r.chunk_prompts)]
    for chunk in chunks:
        pool.issue(chunk)
    return Pending(step, pool, chunks, r.group_size, scorer)


class RolloutStream:
    def __init__(self, workers: list, data: PromptSource, rollout_cfg, seed: int,
                 ready: list[Scored] | None = None, scorer: Scorer | None = None,
                 episodes: tuple | None = None):
        """``scorer`` scores every batch as it is generated; None leaves scoring to the caller."""
        self.pool = workers if isinstance(workers, RolloutPool) else RolloutPool(workers)
        self.data, self.cfg, self.seed, self.scorer = data, rollout_cfg, seed, scorer
        self.episodes = episodes
        self.queue: deque[Pending | Scored] = deque(ready or [])

    def _next_step(self, step: int) -> int:
        return self.queue[-1].step + 1 if self.queue else step

    def take(self, step: int, last_step: int) -> Scored:
        """The batch for ``step``, scored, once the last weight sync's probe passed; generation is launched up
        to
        ``max_staleness`` steps ahead first (never past the run)."""
        while self._next_step(step) <= min(step + self.cfg.max_staleness, last_step - 1):
            s = self._next_step(step)
            draws = self.data.next_batch(self.cfg.prompts_per_step)
            self.queue.append(launch(self.pool, draws, s, self.cfg, self.seed, self.scorer, self.episodes))
        head = self.queue.popleft()
        if head.step != step:
            raise RuntimeError(
                f"rollout stream out of order: wanted step {step}, next batch is step {head.step}")
        taken = head if isinstance(head, Scored) else head.scored()
        # stored bare by a checkpoint of an older version
        if taken.rewards is None and self.scorer is not None:
            taken = score_whole(self.scorer, taken.batch)
        probe = self.pool.checked()
        if self.cfg.dynamic_sampling:
            taken = self._informative(taken, step)
        return replace(taken, probe_max_diff=probe)

    def _informative(self, taken: Scored, step: int) -> Scored:
        """DAPO's dynamic sampling: keep the groups whose rewards differ; while fewer than
        ``prompts_per_step`` remain, draw and score another batch of prompts (at most
        ``rollout.max_resample_rounds`` times), then cut to ``prompts_per_step`` groups. A step still short
        after the last round trains on what it has."""
        if taken.rewards is None:
            raise RuntimeError("rollout.dynamic_sampling needs the stream to verify its batches (a scorer)")
        g, target = self.cfg.group_size, self.cfg.prompts_per_step
        kept, generated, rounds = (taken.groups(taken.rewards.varied_groups(g)),
                                   len(taken.batch.samples) // g, 0)
        while len(kept.batch.samples) // g < target and rounds < self.cfg.max_resample_rounds:
            rounds += 1
            more = launch(self.pool, self.data.next_batch(target), step, self.cfg, self.seed,
                          self.scorer, self.episodes).scored()
            generated += len(more.batch.samples) // g
            kept = Scored.concat([kept, more.groups(more.rewards.varied_groups(g))])
        # nothing varied in any round: the first batch, whose groups teach nothing either
        if not kept.batch.samples:
            kept = taken
        kept = kept.groups(list(range(min(target, len(kept.batch.samples) // g))))
        return replace(kept, generated_groups=generated, resample_rounds=rounds)

    def save_in_flight(self, directory: str) -> None:
        """Finish (and score) the batches launched ahead and store them beside a checkpoint (they are
        generated already, or about to be: the worker runs them before the weight sync that preceded this
        save). That sync's probe is checked first, with or without batches in flight: the checkpoint must not
        follow a failed sync."""
        self.pool.checked()
        done = [b if isinstance(b, Scored) else b.scored() for b in self.queue]
        self.queue = deque(done)
        if done:
            (Path(directory) / IN_FLIGHT_FILE).write_bytes(pickle.dumps(done))


def load_in_flight(checkpoint: Path | None) -> list[Scored]:
    path = checkpoint / IN_FLIGHT_FILE if checkpoint else None
    if not (path and path.is_file()):
        return []
    # Checkpoints written before scoring moved into the stream hold bare batches: ``take`` scores those.
    return [b if isinstance(b, Scored) else Scored(b) for b in pickle.loads(path.read_bytes())]
