"""``cluster.colocate``: the learner and the rollout engine in one process, as verl's hybrid engine and
OpenRLHF's or slime's colocation put them.

``Colocated`` is the learner's rank 0 with a ``RolloutWorker`` inside it. The driver sees one actor in both
roles: the rollout pool's only worker and the learner. A step's new weights reach the engine in place
(``sync_in_place``): the engine copies the learner's tensors into its parameters through the in-process
``weight_sync.IN_PLACE`` backend (a LoRA student: its adapter, built in memory), then the probe checks them
exactly as after a disaggregated sync. Nothing is serialised and nothing goes through the object store, and
the driver makes one call instead of an export and a load.

The two roles share the process's torch state, so each keeps its own: the intra-op thread count (vLLM's CPU
worker re-binds the OpenMP threads at start and forbids ``torch.set_num_threads`` afterwards) and the
learner's global RNG stream (vLLM reseeds it at start and may draw from it; LoRA dropout draws from it too).
With them kept, a colocated run makes the same samples and the same updates, bit for bit, as the
disaggregated one (tests/test_colocate.py).

On CUDA, vLLM's ``sleep``/``wake_up`` would free the engine's KV cache while the learner trains; vLLM's CPU
worker ignores both, so they are not called here: on one GPU today the engine's ``kv_cache_gib`` and the
learner share its memory.
"""

from __future__ import annotations

import contextlib

import torch

from opd.rollout.weight_sync import IN_PLACE
from opd.rollout.worker import RolloutWorker
from opd.trainer.learner import Learner
from opd.types import Prompt, Sample


@contextlib.contextmanager
def _engine_side(threads: int):
    """Run a block as the engine: on its own intra-op thread count, and leaving the learner's global RNG
    stream as it found it (vLLM may draw from it, e.g. while sampling greedy rows).
    ``torch._C.set_num_threads`` is what ``torch.set_num_threads`` calls; vLLM's CPU worker replaces the
    latter with a no-op once it has bound its threads."""
    before, rng = torch.get_num_threads(), torch.get_rng_state()
    torch._C.set_num_threads(threads)
    try:
        yield
    finally:
        torch._C.set_num_threads(before)
        torch.set_rng_state(rng)


class Colocated(Learner):
    def __init__(self, *, worker: dict, engine_threads: int, **learner: object):
        """``worker``: the ``RolloutWorker``'s arguments; ``engine_threads``: its intra-op threads (what its
        own actor's ``num_cpus`` would give it); ``learner``: the ``Learner``'s."""
        super().__init__(**learner)
        self.engine_threads = engine_threads
        with _engine_side(engine_threads):  # vLLM reseeds the global RNG as it starts
            self.worker = RolloutWorker(**worker)

    # -- the rollout worker's calls (``opd.rollout.pool``), on the engine's threads
    def generate(self, draws: list[tuple[Prompt, int]], **kw) -> tuple[list[Sample], float]:
        with _engine_side(self.engine_threads):
            return self.worker.generate(draws, **kw)

    def generate_greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[str]:
        with _engine_side(self.engine_threads):
            return self.worker.generate_greedy(prompt_ids, max_tokens)

    def sync_in_place(self, version: int, probe_ids: list[int], tolerance: float) -> float:
        """The learner's current weights (its adapter, with LoRA) into the engine, then the probe: the
        learner's log-probs of ``probe_ids`` against the engine's, as ``RolloutWorker.load_weights``."""
        expected = self.probe_logprobs(probe_ids)
        if self.lora is not None:
            files = self.export_adapter()
            with _engine_side(self.engine_threads):
                return self.worker.load_adapter(files, version, probe_ids, expected, tolerance)
        with _engine_side(self.engine_threads):
            return self.worker.load_weights(IN_PLACE.publish(self.model.state_dict()), version, probe_ids,
                                            expected, tolerance)
