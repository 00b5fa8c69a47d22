"""Run the configured verifiers in long-lived host actors and fold their scores into one
``opd.types.Rewards``.

Why separate processes: a verifier is arbitrary user code (it may hang, crash or leak), so it must not run
inside the training driver. Calls go, one per (verifier, chunk), to a small pool of long-lived verifier host
actors (``verifiers.num_workers``); a host holding a call still running at the deadline is killed and
replaced, so a stuck chunk costs only its own rows while the rest of the batch still scores.

Conventions:

* the total reward of a row is ``sum(weight_v * score_v)`` over verifiers;
* the FIRST verifier is the correctness check: ``correct[i]`` is ``score_0[i] >= success_threshold``;
* a verifier that fails on a row (raised, timed out, wrong-length list, None/non-finite/non-number, or an
  ``Exception`` instance in place of that row's score) scores 0.0 there
  and the reason is recorded in ``Rewards.failures[uid]`` as ``"name: reason"`` (several joined with ``";
  "``).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from dataclasses import dataclass

import ray
import ray.cloudpickle

from opd.metrics import RoleMetrics
from opd.rewards.registry import FILE_MODULE_MARK, Verifier
from opd.rewards.spec import VerifierSpec, bad_value, checked, scores_problem
from opd.types import Rewards


class _VerifierHost:
    """A long-lived process that runs verifier calls, each on its own thread.

    Threads, so one hung call blocks only itself until the deadline; the whole process is then killed and
    replaced, which is the only way to stop a Python thread. Long-lived, so no call pays a worker cold start
    against its deadline: starting a Ray worker takes seconds on a busy 2-core machine, far more than scoring
    a batch.
    """

    def ready(self) -> bool:
        return True

    def run(self, fn: Verifier, chunk: tuple[list, list, dict],
            kwargs: dict | None = None) -> tuple[bool, object]:
        """Call one verifier on one chunk ``(prompts, completions, columns)``; returns (True, values) or
        (False, reason).

        Exceptions are caught here rather than surfacing as RayTaskError so the reason stays "Type: message"
        without Ray's traceback wrapping.
        """
        prompts, completions, columns = chunk
        try:
            out = call_verifier(fn, prompts, completions, columns, kwargs)
        except Exception as e:  # noqa: BLE001 - any verifier error becomes a per-row failure
            return False, f"{type(e).__name__}: {e}"
        why = scores_problem(out, len(prompts))
        return (False, why) if why else (True, list(out))


def call_verifier(fn: Verifier, prompts: list, completions: list, columns: dict, kwargs: dict | None = None):
    """One verifier call the way a run makes it: columns and config kwargs as keyword arguments, a coroutine
    (an async verifier) run to its result."""
    out = fn(prompts, completions, **columns, **(kwargs or {}))
    return asyncio.run(_await(out)) if inspect.isawaitable(out) else out


async def _await(awaitable):
    return await awaitable


class _HostPool:
    """The verifier hosts of this driver process, shared by every runner in it and rebuilt for a new Ray
    session."""

    def __init__(self):
        self.hosts: list = []
        self.session: str | None = None

    def get(self, n: int) -> list:
        ctx = ray.get_runtime_context()
        # job ids repeat across clusters; the GCS address does not
        session = f"{ctx.gcs_address}/{ctx.get_job_id()}"
        if session != self.session:
            self.hosts, self.session = [], session
        if len(self.hosts) < n:
            new = [_start_host() for _ in range(n - len(self.hosts))]
            ray.get([h.ready.remote() for h in new])  # before any deadline starts counting
            self.hosts += new
        return self.hosts[:n]

    def replace(self, host) -> None:
        """Kill a host holding a hung call and start its successor (waited for, outside any deadline)."""
        ray.kill(host, no_restart=True)
        fresh = _start_host()
        ray.get(fresh.ready.remote())
        self.hosts[self.hosts.index(host)] = fresh


def _start_host():
    # num_cpus=0: verifiers are light and the CPUs are reserved for the engines; they would otherwise queue
    # behind them. max_concurrency: every chunk of a call runs at once, so a hung chunk delays no other.
    return ray.remote(_VerifierHost).options(num_cpus=0, max_concurrency=64, max_restarts=0).remote()


_POOL = _HostPool()


class _Tally:
    """Per verifier, each row's score and whether it failed; per row, the failure reasons in verifier
    order."""

    def __init__(self, names: list[str], n: int):
        self.names = names
        self.scores = {name: [0.0] * n for name in names}
        self.failed = {name: [False] * n for name in names}
        self.reasons: dict[int, list[tuple[int, str]]] = {}

    def fail(self, v: int, rows: range, reason: str) -> None:
        for r in rows:
            self.failed[self.names[v]][r] = True
            self.reasons.setdefault(r, []).append((v, f"{self.names[v]}: {reason}"))

    def take(self, v: int, rows: range, values: list) -> None:
        """A call's values: each usable one is the row's score, each other fails its row alone."""
        for r, value in zip(rows, values, strict=True):
            if bad := bad_value(value):
                self.fail(v, range(r, r + 1), bad)
            else:
                self.scores[self.names[v]][r] = float(value)

    def failures(self, uids: list[str]) -> dict[str, str]:
        return {uids[r]: "; ".join(m for _, m in sorted(msgs)) for r, msgs in sorted(self.reasons.items())}


@dataclass
class _Call:
    verifier: int
    rows: range
    host: object


class VerifierRunner:
    """Scores completions with several weighted verifiers under one wall-clock deadline per call."""

    def __init__(
        self,
        specs: list[VerifierSpec],
        *,
        timeout_s: float = 10.0,
        chunk_size: int = 64,
        success_threshold: float = 1.0,
        num_workers: int = 2,
        job: str | None = None,  # run.name: tags this runner's per-verifier series (none without it)
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        # Validated and resolved now, so a typo in the config fails at start-up rather than at the first step.
        self.specs, self._fns = checked(specs)
        self.timeout_s = float(timeout_s)
        self.chunk_size = int(chunk_size)
        self.num_workers = int(num_workers)
        self.success_threshold = float(success_threshold)
        self.metrics = RoleMetrics("verifier", job=job)

    def score(
        self, uids: list[str], prompts: list[str], completions: list[str], columns: dict[str, list]
    ) -> Rewards:
        """Score every row with every verifier; never raises for a misbehaving verifier (see module
        docstring)."""
        if not ray.is_initialized():
            raise RuntimeError("VerifierRunner.score needs Ray: call ray.init() before scoring")
        n = len(uids)
        if len(prompts) != n or len(completions) != n:
            raise ValueError(f"score: {n} uids, {len(prompts)} prompts, {len(completions)} completions")
        for key, col in columns.items():
            if len(col) != n:
                raise ValueError(f"score: column {key!r} has {len(col)} rows for {n} uids")
        start = time.monotonic()
        tally = _Tally([s.name for s in self.specs], n)
        calls = self._launch(prompts, completions, columns)
        broken = self._collect(calls, tally, deadline=start + self.timeout_s)
        seconds = time.monotonic() - start
        for name in tally.names:
            self.metrics.record(replica=name, rows=n, failed_rows=sum(tally.failed[name]), seconds=seconds)
        for host in broken:
            _POOL.replace(host)
        rewards = [sum(s.weight * tally.scores[s.name][i] for s in self.specs) for i in range(n)]
        first = tally.names[0]
        correct = [not tally.failed[first][i] and tally.scores[first][i] >= self.success_threshold
                   for i in range(n)]
        return Rewards(uids=list(uids), rewards=rewards, correct=correct, per_verifier=tally.scores,
                       failures=tally.failures(uids), verify_seconds=seconds)

    def _launch(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> dict:
        """One call per (verifier, chunk), spread over the hosts. Each chunk goes into the object store once
        and is shared by all verifiers (Ray resolves a top-level ObjectRef argument to its value); each
        function too."""
        n = len(prompts)
        chunks = [range(lo, min(lo + self.chunk_size, n)) for lo in range(0, n, self.chunk_size)]
        data = [ray.put((prompts[c.start : c.stop], completions[c.start : c.stop],
                         {k: list(v[c.start : c.stop]) for k, v in columns.items()})) for c in chunks]
        hosts = _POOL.get(self.num_workers)
        calls: dict = {}  # ObjectRef -> _Call
        for v, fn in enumerate(self._fns):
            _ship_by_value(fn)
            fn_ref = ray.put(fn)
            for rows, data_ref in zip(chunks, data, strict=True):
                host = hosts[len(calls) % len(hosts)]
                calls[host.run.remote(fn_ref, data_ref, self.specs[v].kwargs)] = _Call(v, rows, host)
        return calls

    def _collect(self, calls: dict, tally: _Tally, deadline: float) -> list:
        """Fold each call's result into ``tally`` by the deadline; the hosts to replace (hung or dead)."""
        refs = list(calls)
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
        for ref in pending:
            tally.fail(calls[ref].verifier, calls[ref].rows, f"timeout after {self.timeout_s:g}s")
        broken = {id(calls[r].host): calls[r].host for r in pending}
        for ref in ready:
            call = calls[ref]
            try:
                ok, payload = ray.get(ref)
            # the host died (a verifier exited or crashed it), or fn could not be unpickled
            except Exception as e:
                if isinstance(e, ray.exceptions.RayActorError):
                    broken[id(call.host)] = call.host
                cause = getattr(e, "cause", None) or e
                tally.fail(call.verifier, call.rows, f"{type(cause).__name__}: {cause}")
                continue
            if ok:
                tally.take(call.verifier, call.rows, payload)
            else:
                tally.fail(call.verifier, call.rows, str(payload))
        return list(broken.values())


def _ship_by_value(fn: Verifier) -> None:
    """Functions loaded from a file live in a module the Ray worker cannot import: pickle that module by
    value."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    if module is not None and getattr(module, FILE_MODULE_MARK, None):
        ray.cloudpickle.register_pickle_by_value(module)
