"""The rollout workers as one pool that outlives any one of them.

A rollout actor can die mid-run (``ray.kill``, a crash, the OOM killer). The pool notices it where the driver
first waits on that actor, starts a replacement with the same options and name, and brings it to the state the
dead one should have had: every generation still owed by that worker is issued again, in order, each at the
weight version it was launched at (same draws, same per-draw seeds: the same samples), and then the current
weights are loaded and probed. ``rollout.max_restarts`` bounds the restarts of a run.

The pool is a ``list`` of the live actor handles, replaced in place, so code that iterates ``roles.rollout``
always talks to the current workers. One lock orders every call the pool issues: the driver's main thread and
the scoring thread of an asynchronous stream may both meet a dead worker.

The pool also owns the check of every weight sync: ``publish`` returns at once, and ``checked`` waits for the
last publish's probe. What depends on the workers' weights calls ``checked`` first (the stream before it hands
out a batch or stores one with a checkpoint, ``map`` before a held-out evaluation), so no caller has to
remember it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

log = logging.getLogger("opd.rollout")

# worker handle -> ObjectRef of the probe diff after loading one weight version
Load = Callable[[object], object]


@dataclass
class Chunk:
    """One worker's share of a step's draws: what to generate, at which weight version, and the refs in
    flight.

    ``refs`` is replaced as one tuple (incarnation, samples, seconds, teacher) when the chunk is issued again,
    so a reader never mixes the refs of two attempts."""

    slot: int
    draws: list
    kwargs: dict
    chain: Callable | None = None  # (draws, samples ref) -> teacher scoring ref, started when generation ends
    version: int | None = None
    refs: tuple = field(default=(None, None, None, None))

    def issue(self, worker, incarnation: int) -> None:
        if self.refs[3] is not None:
            # The teacher call chained on a dead worker's generation fails with it; reading its error in the
            # background keeps Ray from reporting it as an unhandled error in the driver log.
            self.refs[3].future().add_done_callback(lambda f: f.exception())
        samples, seconds = worker.generate.options(num_returns=2).remote(self.draws, **self.kwargs)
        teacher = self.chain(self.draws, samples) if self.chain else None
        self.refs = (incarnation, samples, seconds, teacher)

    def finished_ok(self) -> bool:
        """Generation done and its result readable (a dead actor's last call is done too, with an error)."""
        _, samples, _, _ = self.refs
        if not ray.wait([samples], timeout=0)[0]:
            return False
        try:
            ray.get(samples, timeout=0)
            return True
        except ray.exceptions.RayActorError:
            return False


class RolloutPool(list):
    def __init__(self, workers: list, start: Callable[[int], object] | None = None, max_restarts: int = 0,
                 start_timeout_s: float = 600.0, colocated: bool = False):
        super().__init__(workers)
        self.start, self.max_restarts, self.start_timeout_s = start, max_restarts, start_timeout_s
        # the one worker is the learner (cluster.colocate): its death ends the run (resumable)
        self.colocated = colocated
        self.restarts = 0
        self.incarnation = [0] * len(workers)
        self.version: int | None = None  # None: the weights each engine loaded from disk at start
        self.weights: dict[int, Load] = {}
        self.owed: list[Chunk] = []  # issued generations not yet collected, in issue order
        self.lock = threading.RLock()
        self._probe: Callable[[], float] | None = None  # waits for the last publish's loads; None before any

    # -- generation
    # ---------------------------------------------------------------------------------------------
    def issue(self, chunk: Chunk) -> None:
        with self.lock:
            chunk.version = self.version
            chunk.issue(self[chunk.slot], self.incarnation[chunk.slot])
            self.owed.append(chunk)

    def collect(self, chunk: Chunk) -> tuple[list, float, object]:
        """(samples, generate seconds, teacher ref or None) of a chunk, generating it again if its worker
        died."""
        while True:
            incarnation, samples, seconds, teacher = chunk.refs
            try:
                out = ray.get([samples, seconds])
            except ray.exceptions.RayActorError as e:
                self.restart(chunk.slot, incarnation, e)
                continue
            with self.lock:
                if chunk in self.owed:
                    self.owed.remove(chunk)
                self._prune()
            return out[0], out[1], teacher

    # -- weights
    # ------------------------------------------------------------------------------------------------
    def publish(self, version: int, load: Load) -> None:
        """Issue the load of ``version`` on every worker (``load(worker)`` issues the call) and return at
        once.

        A worker runs its calls in order, so generations issued after this publish see these weights whether
        or not anyone waited; ``checked`` waits for the loads and their probes."""
        with self.lock:
            self.weights[version], self.version = load, version
            self._prune()
            issued = [(i, self.incarnation[i], load(w)) for i, w in enumerate(self)]
        done: list[float] = []
        # A worker that died meanwhile is replaced and given the pool's current weights (a later version, if
        # one was published since): never this older one again.
        current = lambda w: self.weights[self.version](w)  # noqa: E731

        def wait() -> float:
            if not done:
                done.append(max(self._wait(i, inc, ref, current) for i, inc, ref in issued))
            return done[0]

        self._probe = wait

    def checked(self) -> float | None:
        """The max probe difference of the last published version, once every worker loaded it (raising the
        probe's error if one failed); None before any publish. Call it before anything generated at those
        weights is used."""
        return self._probe() if self._probe is not None else None

    def map(self, call: Callable, parts: list) -> list:
        """``call(worker, part)`` on worker i for part i (a call that needs no particular weights, like greedy
        evaluation at the current version, which is checked first), re-issued on the replacement when the
        worker dies."""
        self.checked()
        with self.lock:
            issued = [(i, self.incarnation[i], call(self[i], p)) for i, p in enumerate(parts)]
        return [self._wait(i, inc, ref, lambda w, p=parts[i]: call(w, p)) for i, inc, ref in issued]

    def _wait(self, slot: int, incarnation: int, ref, again: Callable):
        while True:
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self.restart(slot, incarnation, e)
                with self.lock:
                    incarnation, ref = self.incarnation[slot], again(self[slot])

    def _prune(self) -> None:
        keep = {c.version for c in self.owed} | {self.version}
        self.weights = {v: f for v, f in self.weights.items() if v in keep}

    # -- restarts
    # -----------------------------------------------------------------------------------------------
    def restart(self, slot: int, incarnation: int, cause: BaseException | None = None) -> None:
        """Replace the dead worker ``slot`` (a no-op when another caller replaced that incarnation
        already)."""
        with self.lock:
            if self.incarnation[slot] != incarnation:
                return
            if self.colocated:
                raise RuntimeError(
                    f"the colocated learner and rollout engine died ({_reason(cause)}); the learner's state "
                    "since the last checkpoint went with it: `opd run --resume` restarts both from that "
                    "checkpoint") from cause
            if self.start is None or self.restarts >= self.max_restarts:
                raise RuntimeError(
                    f"rollout worker {slot} died ({_reason(cause)}) and "
                    f"rollout.max_restarts={self.max_restarts} restarts are used up "
                    f"({self.restarts} so far); look for the cause (out of memory? killed?) in the "
                    "worker's log, or raise rollout.max_restarts"
                ) from cause
            self.restarts += 1
            log.warning("rollout worker %d died (%s); starting a replacement (restart %d of at most %d)",
                        slot, _reason(cause), self.restarts, self.max_restarts)
            try:
                ray.kill(self[slot], no_restart=True)
            except Exception:  # noqa: BLE001 - it is dead already; killing is only to free the name at once
                pass
            worker = self._start(slot)
            self[slot] = worker
            self.incarnation[slot] += 1
            loaded = None
            for chunk in [c for c in self.owed if c.slot == slot and not c.finished_ok()]:
                if chunk.version != loaded and chunk.version is not None:
                    ray.get(self.weights[chunk.version](worker))
                    loaded = chunk.version
                chunk.issue(worker, self.incarnation[slot])
            if self.version is not None:
                ray.get(self.weights[self.version](worker))  # the current weights, probed, after the replays

    def _start(self, slot: int):
        # The dead actor's name is released once the cluster has processed its death; retry until it is.
        deadline = time.monotonic() + 30
        while True:
            try:
                worker = self.start(slot)
                break
            except ValueError as e:
                if "already taken" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        ready, _ = ray.wait([worker.__ray_ready__.remote()], timeout=self.start_timeout_s)
        if not ready:
            raise RuntimeError(f"the replacement of rollout worker {slot} did not start within "
                               f"cluster.start_timeout_s={self.start_timeout_s:g}s")
        ray.get(ready[0])
        return worker


def _reason(cause: BaseException | None) -> str:
    if cause is None:
        return "unknown cause"
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]
