"""Teacher implementations behind one protocol: ``score(samples) -> TeacherScores``.

``VLLMTeacher`` scores with vLLM ``prompt_logprobs`` (temperature 1, ``max_tokens=1``); ``HTTPTeacher``
(``opd.teacher.http``) asks a running ``opd serve-teacher`` for the same numbers. Both return the teacher's
log-prob of every response token the student drew, and optional top-k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from opd.metrics import RoleMetrics
from opd.types import Sample, TeacherScores


class Teacher(Protocol):
    def score(self, samples: list[Sample], top_k: int = 0, hidden: bool = False) -> TeacherScores: ...

    def generate_greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[str]: ...


@dataclass
class ResponseScores:
    """One sequence's response tokens: the teacher's log-prob of each, and optional top-k rows [T][K]."""

    logprobs: list[float]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    hidden: object = None  # numpy float32 [T, H]: final hidden states at the response-predicting positions


_METRICS = RoleMetrics("teacher")  # in a teacher actor (<job>/teacher-<name>): its own series


def record_scored(samples: list[Sample], seconds: float) -> None:
    """A teacher actor's throughput series; nothing outside one."""
    n_tok = sum(len(s.response_ids) for s in samples)
    _METRICS.record(tokens=n_tok, tokens_per_s=n_tok / max(seconds, 1e-9))


def scores_from_rows(samples: list[Sample], rows: list, top_k: int, seconds: float,
                     hidden: bool = False) -> TeacherScores:
    """One ``TeacherScores`` from per-sample rows (``logprobs``, ``topk_ids``, ``topk_logprobs``), checked
    against the samples: the same record whichever teacher (in-process engine or HTTP server) produced the
    rows."""
    scores = TeacherScores(
        uids=[s.uid for s in samples],
        logprobs=[r.logprobs for r in rows],
        topk_ids=[r.topk_ids for r in rows] if top_k else None,
        topk_logprobs=[r.topk_logprobs for r in rows] if top_k else None,
        score_seconds=seconds,
        hidden=[r.hidden for r in rows] if hidden else None,
    )
    scores.validate(samples)
    return scores


class VLLMTeacher:
    def __init__(
        self, model_dir: str, *, seed: int, max_model_len: int | None, kv_cache_gib: float, dtype: str,
        max_logprobs: int,
        # rollout.engine; "hf" scores with transformers (same numbers, no vLLM in the job)
        engine: str = "vllm",
    ):
        from opd.rollout.worker import make_engine

        self.engine = make_engine(
            engine, model_dir, seed=seed, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, dtype=dtype,
            max_logprobs=max_logprobs, enable_weight_sync=False,
        )
        self.max_logprobs = max_logprobs

    def limits(self) -> tuple[int, int]:
        """(vocab size, max model length) of the engine: what a server checks requests against."""
        mc = self.engine.llm.model_config
        return mc.get_vocab_size(), mc.max_model_len

    def score_tokens(self, sequences: list[list[int]], response_starts: list[int], top_k: int = 0,
                     hidden: bool = False) -> list[ResponseScores]:
        """Teacher scores of ``sequences[i][response_starts[i]:]``; the one scoring path in- and
        out-of-process."""
        rows = self.engine.score(sequences, top_k=top_k, starts=response_starts, hidden=hidden)
        out = []
        for seq, start, r in zip(sequences, response_starts, rows, strict=True):
            if len(r.token_logprobs) != len(seq) - start:
                raise ValueError(f"the engine scored {len(r.token_logprobs)} tokens of a "
                                 f"{len(seq) - start}-token response")
            out.append(ResponseScores(r.token_logprobs, r.topk_ids, r.topk_logprobs, r.hidden))
        return out

    def score(self, samples: list[Sample], top_k: int = 0, hidden: bool = False) -> TeacherScores:
        t0 = time.perf_counter()
        rows = self.score_tokens([s.checked_ids("teacher") for s in samples],
                                 [len(s.prompt.token_ids) for s in samples], top_k, hidden)
        seconds = time.perf_counter() - t0
        record_scored(samples, seconds)
        return scores_from_rows(samples, rows, top_k, seconds, hidden)

    def generate_greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[str]:
        outs = self.engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
        return [gens[0].text for gens in outs]
