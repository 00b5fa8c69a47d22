"""``OpenAITeacher``: the teacher protocol against an OpenAI-compatible completions server that returns prompt
log-probs (``vllm serve``): a big teacher already served on its own GPUs, shared by several teams, scores
opd's samples without a second copy.

    teacher = OpenAITeacher("http://127.0.0.1:8000", model="Qwen/Qwen2.5-7B-Instruct")
    scores = teacher.score(samples, top_k=20)     # the same TeacherScores a local VLLMTeacher returns

Each sample's token ids go as the prompt of ``/v1/completions`` with ``max_tokens: 1`` and ``prompt_logprobs:
k``; the server answers, per prompt position, the log-prob of the token that is there and its top-k
alternatives (by rank), from the raw logits at temperature 1. What a completions server cannot give (the full
vocabulary, hidden states) is refused by the config. The retry rules are the HTTP teacher's
(``RetryingClient``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from opd.teacher.http import RetryingClient, TeacherServerError
from opd.teacher.scorer import ResponseScores, record_scored, scores_from_rows
from opd.types import Sample, TeacherScores


def served_models(client: RetryingClient) -> dict[str, dict]:
    """The models a server serves, by id (with their ``max_model_len`` where vLLM reports it)."""
    return {m["id"]: m for m in client.request("GET", "/v1/models").get("data", [])}


def position_row(entry: dict | None, token: int, top_k: int,
                 where: str) -> tuple[float, list[int], list[float]]:
    """(log-prob of ``token``, top-k ids, their log-probs) from one ``prompt_logprobs`` entry."""
    if not entry or str(token) not in entry:
        raise TeacherServerError(f"{where}: the reply has no log-prob for token {token}")
    ranked = sorted(((v["rank"], int(k), float(v["logprob"])) for k, v in entry.items() if v.get("rank")),
                    key=lambda x: x[0])[:top_k]
    if len(ranked) < top_k:
        raise TeacherServerError(f"{where}: asked for the top {top_k}, the reply holds {len(ranked)}")
    return float(entry[str(token)]["logprob"]), [i for _, i, _ in ranked], [lp for _, _, lp in ranked]


class OpenAITeacher:
    def __init__(self, url: str, model: str, token: str | None = None, *, timeout_s: float = 60.0,
                 retry_deadline_s: float = 300.0, sequences_per_request: int = 32,
                 parallel_requests: int = 4):
        self.client = RetryingClient(url, token, timeout_s=timeout_s, retry_deadline_s=retry_deadline_s)
        self.model = model
        self.sequences_per_request = sequences_per_request
        self.pool = ThreadPoolExecutor(max_workers=parallel_requests, thread_name_prefix="teacher-openai")
        if model not in served_models(self.client):  # fail at start-up, not at the first step
            raise TeacherServerError(f"{self.client.url} does not serve {model!r}")

    def score(self, samples: list[Sample], top_k: int = 0, hidden: bool = False) -> TeacherScores:
        if hidden:
            raise ValueError("a completions server returns log-probs, not hidden states: run the teacher "
                             "locally")
        t0 = time.perf_counter()
        n = self.sequences_per_request
        parts = [samples[i : i + n] for i in range(0, len(samples), n)]
        rows = [r for part in self.pool.map(lambda p: self._score(p, top_k), parts) for r in part]
        seconds = time.perf_counter() - t0
        record_scored(samples, seconds)
        return scores_from_rows(samples, rows, top_k, seconds)

    def _complete(self, body: dict) -> list[dict]:
        reply = self.client.request("POST", "/v1/completions", {"model": self.model, **body})
        return sorted(reply["choices"], key=lambda c: c["index"])

    def _score(self, samples: list[Sample], top_k: int) -> list[ResponseScores]:
        choices = self._complete({"prompt": [s.checked_ids("teacher") for s in samples], "max_tokens": 1,
                                  "temperature": 1.0, "prompt_logprobs": top_k})
        if len(choices) != len(samples):
            raise TeacherServerError(f"{self.client.url}: {len(choices)} choices for {len(samples)} prompts")
        rows = []
        for s, choice in zip(samples, choices, strict=True):
            entries, start = choice.get("prompt_logprobs") or [], len(s.prompt.token_ids)
            where = f"{self.client.url}/v1/completions, sample {s.uid}"
            per = [position_row(entries[t] if t < len(entries) else None, s.full_ids[t], top_k, where)
                   for t in range(start, len(s.full_ids))]
            rows.append(ResponseScores([p[0] for p in per], [p[1] for p in per] if top_k else None,
                                       [p[2] for p in per] if top_k else None))
        return rows

    def generate_greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[str]:
        return [c["text"] for c in self._complete({"prompt": prompt_ids, "max_tokens": max_tokens,
                                                   "temperature": 0.0})]
