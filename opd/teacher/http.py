"""``HTTPTeacher``: the teacher protocol over HTTP, against ``opd serve-teacher`` or any server speaking its
JSON.

    teacher = HTTPTeacher("http://127.0.0.1:8000", token=os.environ.get("OPD_TEACHER_TOKEN"),
    retry_deadline_s=300)
    scores = teacher.score(samples, top_k=0)      # the same TeacherScores a local VLLMTeacher returns

Connection errors, timeouts, 5xx, 408 and 429 answers are retried (scoring is idempotent) with capped,
jittered exponential back-off until ``retry_deadline_s`` has passed since the request started; then
``TeacherServerError`` names the URL, how long it tried and the last error. Any other 4xx is the caller's
mistake and fails at once with the server's message. Used by the pipeline as the teacher actor when
``teacher.url`` is set (``teacher.retry_deadline_s``).
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from opd.errors import TeacherServerError
from opd.teacher.api import GenerateResponse, Health, ScoreResponse
from opd.teacher.scorer import record_scored, scores_from_rows
from opd.types import Sample, TeacherScores

log = logging.getLogger(__name__)
# The server (or a proxy in front of it) is restarting, overloaded or gone for now: worth another try.
# ChunkedEncoding covers a connection cut mid-reply.
RETRY_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
RETRY_STATUS = (408, 429)


class RetryingClient:
    """JSON over HTTP with the teacher's retry rules: connection errors, timeouts, 5xx, 408 and 429 are
    retried with capped, jittered exponential back-off until ``retry_deadline_s``; any other 4xx fails at once
    with the server's message. Shared by every teacher client (``HTTPTeacher``,
    ``opd.teacher.openai.OpenAITeacher``)."""

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 60.0,
                 retry_deadline_s: float = 300.0, backoff_s: float = 0.5, max_backoff_s: float = 15.0):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s, self.retry_deadline_s = timeout_s, retry_deadline_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        where = f"teacher server {self.url}{path}"
        start = time.monotonic()
        deadline = start + self.retry_deadline_s
        attempt = 0
        while True:
            attempt += 1
            # Connecting never waits past the deadline (a black-holed host); a slow reply gets the full
            # timeout.
            connect_s = min(self.timeout_s, max(deadline - time.monotonic(), 0.5))
            try:
                r = requests.request(method, self.url + path, json=body, headers=self.headers,
                                     timeout=(connect_s, self.timeout_s))
                if r.status_code < 400:
                    return r.json()
                if r.status_code < 500 and r.status_code not in RETRY_STATUS:
                    raise TeacherServerError(f"{where} refused the request: "
                                             f"HTTP {r.status_code}: {_detail(r)}")
                why = f"HTTP {r.status_code}: {_detail(r)}"
            except RETRY_ERRORS as e:
                why = f"{type(e).__name__}: {e}"
            # a 2xx that is not JSON: a proxy's page, or a reply cut short
            except requests.JSONDecodeError as e:
                why = f"reply is not JSON ({e}): {r.text[:200]!r}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise TeacherServerError(
                    f"{where} unreachable: gave up after {time.monotonic() - start:.1f} s and {attempt} "
                    f"attempts (retry deadline {self.retry_deadline_s:g} s, teacher.retry_deadline_s); "
                    f"last error: {why}"
                )
            # Capped exponential back-off with jitter, so many clients of one restarting server do not return
            # in step; the last pause is cut short so one more attempt lands right at the deadline.
            pause = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            pause = min(pause, left)
            log.warning("%s: attempt %d failed (%s); retrying in %.2f s (%.0f s left before giving up)",
                        where, attempt, why, pause, left)
            time.sleep(pause)




class HTTPTeacher:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        retry_deadline_s: float = 300.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 15.0,
        sequences_per_request: int = 64,
        parallel_requests: int = 4,
    ):
        self.client = RetryingClient(url, token, timeout_s=timeout_s, retry_deadline_s=retry_deadline_s,
                                     backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        self.sequences_per_request = sequences_per_request
        # Concurrent requests let the server's @serve.batch merge them and spread them over its replicas.
        self.pool = ThreadPoolExecutor(max_workers=parallel_requests, thread_name_prefix="teacher-http")
        # Fail at start-up, not at the first step, when the server is unreachable or refuses the token.
        self.info = self.health()
        # /health is open; this checks the token
        self.client.request("POST", "/v1/score", {"sequences": [], "top_k": 0})

    def health(self) -> Health:
        return Health.model_validate(self.client.request("GET", "/health"))

    def score(self, samples: list[Sample], top_k: int = 0, hidden: bool = False) -> TeacherScores:
        # refused by the config check (opd.full_vocab_source=teacher needs a local teacher); a direct caller
        if hidden:
            raise ValueError("a teacher server returns log-probs, not hidden states: run the teacher locally")
        t0 = time.perf_counter()
        n = self.sequences_per_request
        bodies = [
            {"sequences": [{"token_ids": s.checked_ids("teacher"), "response_start": len(s.prompt.token_ids)}
                           for s in samples[i : i + n]],
             "top_k": top_k}
            for i in range(0, len(samples), n)
        ]
        rows = [r for reply in self.pool.map(lambda b: self.client.request("POST", "/v1/score", b), bodies)
                for r in ScoreResponse.model_validate(reply).scores]
        seconds = time.perf_counter() - t0
        record_scored(samples, seconds)
        return scores_from_rows(samples, rows, top_k, seconds)

    def generate_greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[str]:
        reply = self.client.request("POST", "/v1/generate", {"prompts": prompt_ids, "max_tokens": max_tokens})
        return GenerateResponse.model_validate(reply).texts


def _detail(r: requests.Response) -> str:
    """The server's own words: opd's ``detail``, an OpenAI server's ``error.message``, or the body."""
    try:
        body = r.json()
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        return str(body.get("detail") or message or r.text)[:500]
    except (ValueError, AttributeError):
        return r.text[:500]
