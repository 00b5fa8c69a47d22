"""The pre-flight of a served teacher (``teacher.url``, either protocol), once, before anything starts: it
answers; it serves ``teacher.model``; it accepts the token; it tokenises as the student does; it gives the
top-k a run asks for and holds a run's longest sequence. Each problem comes back as ``(key, message)`` for the
caller to report; one attempt each (a job start does not wait out the retry deadline).
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.teacher.http import RetryingClient, TeacherServerError

_ATTEMPT_S = 10.0


@dataclass(frozen=True)
class Served:
    url: str
    protocol: str  # opd | openai
    model: str | None
    token: str | None
    top_k: int
    max_model_len: int  # rollout.max_model_len


def problems(s: Served, samples: list[tuple[str, list[int]]]) -> list[tuple[str, str]]:
    """``samples``: (rendered prompt text, the student's ids for it), to compare the server's tokenizer
    with."""
    client = RetryingClient(s.url, s.token, timeout_s=_ATTEMPT_S, retry_deadline_s=0.0)
    try:
        return _openai(client, s, samples) if s.protocol == "openai" else _opd(client, s)
    except TeacherServerError as e:
        return [(_key(str(e)), str(e))]


def _key(message: str) -> str:
    """The config key a refusal is about: a refused token is ``teacher.token_env``'s, anything else the
    URL's."""
    return "teacher.token_env" if "HTTP 401" in message or "HTTP 403" in message else "teacher.url"


def _opd(client: RetryingClient, s: Served) -> list[tuple[str, str]]:
    from opd.teacher.api import Health

    health = Health.model_validate(client.request("GET", "/health"))
    # /health is open; this needs the token
    client.request("POST", "/v1/score", {"sequences": [], "top_k": 0})
    found = []
    if s.model is not None and s.model != health.model:
        found.append(("teacher.model", f"{s.url} serves {health.model!r}, not {s.model!r}"))
    if health.max_logprobs is not None and s.top_k > health.max_logprobs:
        found.append(("teacher.top_k", f"{s.top_k} exceeds what {s.url} gives ({health.max_logprobs}, its "
                                       "--max-logprobs)"))
    if health.max_model_len is not None and s.max_model_len > health.max_model_len:
        found.append(("rollout.max_model_len", f"{s.max_model_len} exceeds {s.url}'s max_model_len "
                                               f"({health.max_model_len})"))
    return found


def _openai(client: RetryingClient, s: Served, samples: list[tuple[str, list[int]]]) -> list[tuple[str, str]]:
    from opd.teacher.openai import served_models

    models = served_models(client)
    if s.model not in models:
        return [("teacher.model", f"{s.url} serves {sorted(models)}, not {s.model!r}")]
    found = []
    limit = models[s.model].get("max_model_len")
    if isinstance(limit, int) and s.max_model_len > limit:
        found.append(("rollout.max_model_len", f"{s.max_model_len} exceeds {s.model!r}'s max_model_len on "
                                               f"{s.url} ({limit})"))
    for text, ids in samples:
        body = {"model": s.model, "prompt": text, "add_special_tokens": False}
        got = client.request("POST", "/tokenize", body).get("tokens")
        if got != ids:
            found.append(("teacher.model", f"{s.model!r} on {s.url} tokenises {text[:60]!r} as {got} and "
                                           f"the student as {ids}: the teacher must share its tokenizer"))
            break
    if samples:
        probe = {"model": s.model, "prompt": [samples[0][1]], "max_tokens": 1, "prompt_logprobs": s.top_k}
        try:
            client.request("POST", "/v1/completions", probe)
        except TeacherServerError as e:
            key = "teacher.top_k" if "logprobs" in str(e) else _key(str(e))
            found.append((key, str(e)))
    return found
