"""Fault-injection plug-ins of the soak benchmark (``benchmarks/soak.py``).

``flaky_verifier`` is an ordinary verifier plug-in, loaded by path like a user's
(``benchmarks/soak_faults.py:flaky_verifier``) and listed after ``exact_answer`` so correctness still counts.
On a seeded share of its calls it misbehaves in one of the ways user code does: it raises, hangs past
``verifiers.timeout_s``, returns NaN for some rows, returns a list of the wrong length, or kills its own
process.

Which calls misbehave is a pure function of the seed and the call's rows (prompts and completions), not of a
counter: a step that is re-run after the driver was killed and resumed draws the same samples, so it meets the
same fault again and the final record can be checked against it. Each injected fault is appended (and fsynced,
before it acts: ``exit`` leaves no chance afterwards) to ``log_path`` as one JSON line: kind, key, and the
rows it hit. Calls on held-out prompts (evaluation, warm-up) are never faulted: evaluation retries failed rows
once and then fails loudly by design, which is not what this benchmark measures.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

KINDS = ("raise", "hang", "nan", "short", "exit")

# What the runner records in Rewards.failures (samples.jsonl's "failure") for each kind, as a substring.
EXPECTED_REASON = {
    "raise": "soak: injected failure",
    "hang": "timeout after",
    "nan": "non-finite",
    "short": "scores for",
    # the host died mid-call; Ray's error text varies by version: any failure of this verifier counts
    "exit": "",
}

def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big")


def _skip_set(path: str | None) -> frozenset:
    if not path:
        return frozenset()
    # small, and read per call: a module shipped by value keeps no cache between calls anyway
    with open(path) as f:
        return frozenset(json.load(f))


def plan_fault(seed: int, rate: float, prompts: list[str], completions: list[str]) -> tuple[str | None, int]:
    """(kind or None, key) of one call: a fault with probability ``rate``, its kind uniform over ``KINDS``."""
    key = _digest(seed, prompts, completions)
    if (key % 1_000_003) / 1_000_003 >= rate:
        return None, key
    return KINDS[_digest(seed, "kind", key) % len(KINDS)], key


def _record(log_path: str, entry: dict) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def flaky_verifier(prompts: list[str], completions: list[str], *, seed: int = 0, rate: float = 0.1,
                   log_path: str | None = None, skip_prompts_path: str | None = None, hang_s: float = 60.0,
                   **columns) -> list[float]:
    """Scores 1.0 for a non-empty completion (a harmless format check), except on the calls ``plan_fault``
    picks."""
    scores = [1.0 if c.strip() else 0.0 for c in completions]
    if not prompts or _skip_set(skip_prompts_path).intersection(prompts):
        return scores
    kind, key = plan_fault(seed, rate, prompts, completions)
    if kind is None:
        return scores
    rows = list(range(len(prompts)))
    if kind == "nan":  # a seeded non-empty subset of the rows; the others must still score
        rows = [i for i in rows if _digest(seed, "row", key, i) % 2] or [0]
    if log_path:
        _record(log_path, {"kind": kind, "key": key, "pid": os.getpid(), "time": time.time(),
                           "rows": [[prompts[i], completions[i]] for i in rows]})
    if kind == "raise":
        raise RuntimeError(f"soak: injected failure (call {key:x})")
    if kind == "hang":
        time.sleep(hang_s)  # the runner's deadline passes first; it kills this process and starts another
        return scores
    if kind == "nan":
        return [math.nan if i in rows else s for i, s in enumerate(scores)]
    if kind == "short":
        return scores[:-1]
    os._exit(17)  # "exit": the verifier takes its whole host process down, as a segfaulting extension would


class FlakyTeacherProxy:
    """An HTTP proxy in front of ``opd serve-teacher`` that can be taken down for a while (every request in
    the window gets its connection cut without a reply, as during a server restart) and that, on seeded
    /v1/score replies, turns one teacher top-k log-prob into NaN (a teacher that returns garbage)."""

    def __init__(self, upstream: str, seed: int, nan_rate: float, log_path: str):
        import http.server
        import threading

        import requests

        self.upstream, self.seed, self.nan_rate, self.log_path = (upstream.rstrip("/"), seed, nan_rate,
                                                                  log_path)
        self.down_until = 0.0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _forward(self, method: str) -> None:
                body = (self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST"
                        else None)
                if time.time() < proxy.down_until:
                    self.close_connection = True  # no reply at all: the client sees the connection drop
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("authorization", "content-type")}
                r = requests.request(method, proxy.upstream + self.path, data=body, headers=headers,
                                     timeout=600)
                payload = r.content
                if method == "POST" and self.path == "/v1/score" and r.ok:
                    payload = proxy._maybe_nan(body, r.json())
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _maybe_nan(self, request: bytes, reply: dict) -> bytes:
        """A content-keyed choice, like the verifier's: a re-run step after a resume meets the same reply
        again."""
        key = _digest(self.seed, "teacher", request.decode())
        scores = reply.get("scores") or []
        hit = [i for i, s in enumerate(scores) if s.get("topk_logprobs") and s["topk_logprobs"][0]]
        if hit and (key % 1_000_003) / 1_000_003 < self.nan_rate:
            row = scores[hit[key % len(hit)]]
            row["topk_logprobs"][0][0] = math.nan
            seq = json.loads(request)["sequences"][hit[key % len(hit)]]
            _record(self.log_path, {"kind": "teacher_nan", "key": key, "time": time.time(),
                                    "prompt_ids": seq["token_ids"][: seq["response_start"]]})
        return json.dumps(reply).encode()

    def take_down(self, seconds: float) -> None:
        self.down_until = time.time() + seconds

    def close(self) -> None:
        self.server.shutdown()


TOOL_KINDS = ("raise", "hang", "huge", "crash")
# What the observation of each tool fault says, as a substring of the environment's tokens in samples.jsonl
TOOL_OBSERVATION = {"raise": "soak: injected tool failure", "hang": "timed out after",
                    "huge": "[truncated:", "crash": "[killed by signal"}


def _call_tool(kind: str, n: int) -> str:
    """The soak's tool: echoes ``n``, or misbehaves as ``kind`` says.

    Args:
        kind: ok, or one of the injected faults (TOOL_KINDS)
        n: a number to echo
    """
    from opd.agents.tools import python

    if kind == "raise":
        raise RuntimeError("soak: injected tool failure")
    if kind == "hang":
        time.sleep(60.0)
    if kind == "huge":
        return "7" * 1_000_000
    if kind == "crash":  # the python tool's sandbox killed from inside
        return python("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    return str(n)


class FlakyTools:
    """An agent environment for the soak (``agent.environment: benchmarks/soak_faults.py:FlakyTools``): it
    runs a tool on each of the first ``turns - 1`` turns whatever the student wrote (the demo student never
    learned to call one) and ends the episode as answered at turn ``turns``. On a seeded share of calls the
    tool misbehaves (``TOOL_KINDS``): it raises, hangs past its timeout, returns a megabyte, or its sandbox is
    killed. Which call is a pure function of the seed, the prompt and the turn, logged as ``flaky_verifier``'s
    faults are, and held-out prompts are left alone as there. Results come back as user messages (the demo
    template has no tool role)."""

    tools: list = []

    def __init__(self, seed: int = 0, rate: float = 0.3, turns: int = 2, timeout_s: float = 1.0,
                 log_path: str | None = None, skip_prompts_path: str | None = None):
        from opd.agents.tools import Tool

        self.seed, self.rate, self.turns, self.log_path = seed, rate, turns, log_path
        self.skip = _skip_set(skip_prompts_path)
        self.tool = Tool.from_function(_call_tool, timeout_s)
        self.prompt, self.turn = "", 0

    def reset(self, row: dict, seed: int) -> list[dict]:
        self.prompt, self.turn = str(row["prompt"]), 0
        return [{"role": "user", "content": self.prompt}]

    def step(self, turn: str):
        from opd.agents.env import EnvStep

        self.turn += 1
        if self.turn >= self.turns:
            return EnvStep(done=True, stop="answered")
        kind, key = plan_fault(self.seed, 0.0 if self.prompt in self.skip else self.rate, [self.prompt],
                               [f"{self.turn}"])
        if kind is not None:
            kind = TOOL_KINDS[key % len(TOOL_KINDS)]
            if self.log_path:
                _record(self.log_path, {"kind": f"tool_{kind}", "key": key, "prompt": self.prompt,
                                        "turn": self.turn})
        r = self.tool.call({"kind": kind or "ok", "n": len(turn)})
        failed = r.status == "error" or "[killed by signal" in r.text
        return EnvStep(observations=[{"role": "user", "content": r.text}], tool_calls=1,
                       tool_errors=int(failed), tool_timeouts=int(r.status == "timeout"))

    def close(self) -> None:
        pass

