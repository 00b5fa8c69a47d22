"""Teacher implementations behind one protocol: ``score(samples) -> TeacherScores``.

``VLLMTeacher`` scores with vLLM ``prompt_logprobs`` (temperature 1, ``max_tokens=1``); ``HFTeacher`` with a plain
forward pass. Both return the teacher's log-prob of every response token the student drew, and optional top-k.
"""

from __future__ import annotations

import time
from typing import Protocol

from opd.teacher.align import align_response
from opd.types import Sample, TeacherScores


class Teacher(Protocol):
    def score(self, samples: list[Sample], top_k: int = 0) -> TeacherScores: ...


class VLLMTeacher:
    def __init__(self, model_dir: str, *, seed: int, max_model_len: int, kv_cache_gib: float, dtype: str, max_logprobs: int):
        from opd.rollout.engine import VLLMEngine

        self.engine = VLLMEngine(
            model_dir, seed=seed, max_model_len=max_model_len, max_logprobs=max_logprobs,
            kv_cache_gib=kv_cache_gib, dtype=dtype, enable_weight_sync=False,
        )

    def score(self, samples: list[Sample], top_k: int = 0) -> TeacherScores:
        t0 = time.perf_counter()
        rows = self.engine.score([s.full_ids for s in samples], top_k=top_k)
        logprobs, ids, lps = [], [], []
        for s, r in zip(samples, rows, strict=True):
            p, t = len(s.prompt.token_ids), len(s.response_ids)
            logprobs.append(align_response(r.token_logprobs, p, t))
            if top_k:
                ids.append(align_response(r.topk_ids, p, t))
                lps.append(align_response(r.topk_logprobs, p, t))
        scores = TeacherScores(
            uids=[s.uid for s in samples],
            logprobs=logprobs,
            topk_ids=ids if top_k else None,
            topk_logprobs=lps if top_k else None,
            score_seconds=time.perf_counter() - t0,
        )
        scores.validate(samples)
        return scores

    def generate_greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[str]:
        outs = self.engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
        return [gens[0].text for gens in outs]
