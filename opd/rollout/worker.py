"""RolloutWorker: an engine (vLLM; transformers with ``rollout.engine=hf``) that samples G answers per prompt
and takes new weights from the learner.

After every weight load it re-scores a fixed probe sequence and compares with the learner's log-probs: a sync
that silently failed (peers' costliest bug class) stops the run here, naming the weight version.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib

from opd.metrics import RoleMetrics
from opd.rollout.engine import VLLMEngine
from opd.rollout.weight_sync import LocalWeights, WeightBuckets, receive
from opd.types import Prompt, Sample, sample_uid


class WeightSyncError(RuntimeError):
    pass


class _RotaryReloadNotice(logging.Filter):
    """vLLM warns at every weight reload that the rotary embedding "failed to load weights": it has none (its
    frequencies are computed, not stored), so nothing is wrong, and the probe check after each sync proves the
    weights. Dropping that one line keeps a real warning from drowning in hundreds of copies."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage() == "RotaryEmbedding: Failed to load weights")


def make_engine(engine: str, model_dir: str, *, seed: int, max_model_len: int | None, kv_cache_gib: float,
                dtype: str, lora_rank: int = 0, **vllm_kw):
    """``rollout.engine``: ``vllm`` (production) or ``hf`` (transformers, same protocol), for the rollout
    workers and the local teachers alike. The hf engine keeps the torch thread count Ray gives the actor
    (OMP_NUM_THREADS = its
    ``num_cpus``) and ignores the vLLM-only keywords."""
    if engine == "hf":
        if lora_rank:
            raise ValueError("rollout.engine=hf does not serve LoRA adapters (lora.r > 0): "
                             "use rollout.engine=vllm")
        from opd.rollout.hf_engine import HFEngine

        return HFEngine(model_dir, seed=seed, max_model_len=max_model_len, dtype=dtype)
    if engine != "vllm":
        raise ValueError(f"rollout.engine={engine!r}: expected 'vllm' or 'hf'")
    return VLLMEngine(model_dir, seed=seed, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                      dtype=dtype, lora_rank=lora_rank, **vllm_kw)


class RolloutWorker:
    def __init__(self, model_dir: str, *, seed: int, max_model_len: int, kv_cache_gib: float, dtype: str,
                 worker_id: int = 0, lora_rank: int = 0, engine: str = "vllm"):
        self.worker_id = worker_id
        self.engine = make_engine(engine, model_dir, seed=seed, max_model_len=max_model_len,
                                  kv_cache_gib=kv_cache_gib, dtype=dtype, lora_rank=lora_rank)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadNotice())
        self.version = 0
        self.metrics = RoleMetrics("rollout")  # <job>/rollout-<i>: this worker's own series
        self.metrics.record(tokens=0, weight_version=0)

    def generate(
        self, draws: list[tuple[Prompt, int]], *, n: int, temperature: float, top_p: float, max_tokens: int,
        seed: int, episodes: tuple | None = None
    ) -> tuple[list[Sample], float]:
        """n samples per (prompt, epoch), in order. Per-draw seeds make rollouts reproducible on resume.
        ``episodes`` (``opd.agents.episode_setup``): each sample is a multi-turn episode, a turn at most
        ``max_tokens``; per call, so one worker serves single-turn and agent jobs alike."""
        t0 = time.perf_counter()
        if episodes is not None:
            from opd.agents.runner import EpisodeRunner

            spec, limits = episodes
            runner = EpisodeRunner(self.engine, self.engine.tokenizer, spec,
                                   dataclasses.replace(limits, max_turn_tokens=max_tokens))
            samples = runner.run(draws, n=n, temperature=temperature, top_p=top_p, seed=seed,
                                 version=self.version)
            return samples, self._record(samples, t0)
        # stable across processes
        seeds = [zlib.crc32(f"{seed}/{e}/{p.prompt_id}".encode()) for p, e in draws]
        outs = self.engine.generate(
            [p.token_ids for p, _ in draws], n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
            seeds=seeds
        )
        samples = [
            Sample(
                uid=sample_uid(p.prompt_id, g, epoch),
                prompt=p,
                group_index=g,
                response_ids=gen.token_ids,
                response_text=gen.text,
                sampler_logprobs=gen.logprobs,
                weight_version=self.version,
                finish_reason=gen.finish_reason,
            )
            for (p, epoch), gens in zip(draws, outs, strict=True)
            for g, gen in enumerate(gens)
        ]
        return samples, self._record(samples, t0)

    def _record(self, samples: list[Sample], t0: float) -> float:
        seconds = time.perf_counter() - t0
        n_tok = sum(len(s.response_ids) for s in samples)
        self.metrics.record(tokens=n_tok, tokens_per_s=n_tok / max(seconds, 1e-9))
        return seconds

    def generate_greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[str]:
        outs = self.engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
        return [gens[0].text for gens in outs]

    def load_weights(self, weights: WeightBuckets | LocalWeights, version: int, probe_ids: list[int],
                     expected: list[float], tolerance: float) -> float:
        """Load version ``version`` (published by the learner through a ``weight_sync`` backend) and verify it
        against the learner's probe log-probs; returns the max difference."""
        self.engine.load_weights(receive(weights))
        return self._probe("weight version", "weights", version, probe_ids, expected, tolerance)

    def load_adapter(self, files: dict[str, bytes], version: int, probe_ids: list[int], expected: list[float],
                     tolerance: float) -> float:
        """LoRA students: serve adapter ``version`` (its PEFT files) and verify it with the probe, as
        ``load_weights``."""
        self.engine.load_adapter(files, version)
        return self._probe("LoRA adapter version", "adapter", version, probe_ids, expected, tolerance)

    def _probe(self, what: str, noun: str, version: int, probe_ids: list[int], expected: list[float],
               tolerance: float) -> float:
        got = self.engine.score([probe_ids])[0].token_logprobs
        diff = max(abs(a - b) for a, b in zip(got, expected, strict=True))
        if not diff <= tolerance:
            raise WeightSyncError(
                f"rollout worker {self.worker_id}: {what} {version} failed the probe check "
                f"(max |logprob diff| {diff:.3g} > tolerance {tolerance:.3g}); "
                f"the engine is not serving the learner's {noun}"
            )
        self.version = version
        self.metrics.record(weight_version=version)
        return diff
