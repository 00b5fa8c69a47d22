"""``HTTPTeacher``: the teacher protocol over HTTP, against ``opd serve-teacher`` or any server speaking its JSON.

    teacher = HTTPTeacher("http://127.0.0.1:8000", token=os.environ.get("OPD_TEACHER_TOKEN"))
    scores = teacher.score(samples, top_k=0)      # the same TeacherScores a local VLLMTeacher returns

Connection errors, timeouts and 5xx answers are retried with exponential back-off (scoring is idempotent); a 4xx
answer is the caller's mistake and fails at once with the server's message. Used by the pipeline as the teacher
actor when ``teacher.url`` is set.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import requests

from opd.teacher.api import GenerateResponse, Health, ScoreResponse
from opd.teacher.scorer import scores_from_rows
from opd.types import Sample, TeacherScores


class TeacherServerError(RuntimeError):
    """The teacher server refused a request (4xx) or stayed unreachable after every retry; names the URL."""


class HTTPTeacher:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        sequences_per_request: int = 64,
        parallel_requests: int = 4,
    ):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.sequences_per_request = sequences_per_request
        # Concurrent requests let the server's @serve.batch merge them and spread them over its replicas.
        self.pool = ThreadPoolExecutor(max_workers=parallel_requests, thread_name_prefix="teacher-http")
        # Fail at start-up, not at the first step, when the server is unreachable or refuses the token.
        self.info = self.health()
        self._request("POST", "/v1/score", {"sequences": [], "top_k": 0})  # /health is open; this checks the token

    def health(self) -> Health:
        return Health.model_validate(self._request("GET", "/health"))

    def score(self, samples: list[Sample], top_k: int = 0) -> TeacherScores:
        t0 = time.perf_counter()
        n = self.sequences_per_request
        bodies = [
            {"sequences": [{"token_ids": s.full_ids, "response_start": len(s.prompt.token_ids)} for s in samples[i : i + n]],
             "top_k": top_k}
            for i in range(0, len(samples), n)
        ]
        rows = [r for reply in self.pool.map(lambda b: self._request("POST", "/v1/score", b), bodies)
                for r in ScoreResponse.model_validate(reply).scores]
        return scores_from_rows(samples, rows, top_k, time.perf_counter() - t0)

    def generate_greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[str]:
        reply = self._request("POST", "/v1/generate", {"prompts": prompt_ids, "max_tokens": max_tokens})
        return GenerateResponse.model_validate(reply).texts

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        where = f"teacher server {self.url}{path}"
        why = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = requests.request(method, self.url + path, json=body, headers=self.headers, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as e:
                why = f"{type(e).__name__}: {e}"
                continue
            if r.status_code >= 500:
                why = f"HTTP {r.status_code}: {r.text[:300]}"
                continue
            if r.status_code >= 400:
                raise TeacherServerError(f"{where} refused the request: HTTP {r.status_code}: {_detail(r)}")
            return r.json()
        raise TeacherServerError(f"{where} unreachable after {self.retries + 1} attempts; last error: {why}")


def _detail(r: requests.Response) -> str:
    try:
        return str(r.json().get("detail", r.text))[:500]
    except ValueError:
        return r.text[:500]
