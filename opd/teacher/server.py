"""``opd serve-teacher``: the vLLM teacher as a Ray Serve deployment speaking JSON over HTTP.

    OPD_TEACHER_TOKEN=s3cret opd serve-teacher models/demo/teacher --port 8000 --replicas 2

Endpoints (schema at ``/openapi.json``): ``GET /health``, ``POST /v1/score`` (per-token log-probs of response
tokens, batched across concurrent requests with ``@serve.batch``), ``POST /v1/generate`` (greedy) and
``POST /v1/reward`` (black-box reward = mean per-token teacher log-prob of a completion). ``docs/service.md``
describes auth and limits; ``opd.teacher.api`` holds the records and request checks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from opd.teacher import api
from opd.teacher.scorer import VLLMTeacher

APP_NAME = "opd-teacher"
OPEN_PATHS = ("/health",)  # answered without a token: liveness probes carry no secrets
REWARD_DOC = (
    "Black-box reward of each completion: the teacher's mean per-token log-prob of the completion given its "
    "prompt, (1/T) * sum_t log pi_T(c_t | prompt, c_<t). Always <= 0; higher means the teacher finds the "
    "completion more likely. Empty completions are refused (the mean of no tokens is undefined)."
)


@dataclass(frozen=True)
class ServerSettings:
    model_dir: str
    token: str | None = None
    max_body_bytes: int = 16 << 20
    max_batch_size: int = 8  # /v1/score requests merged into one engine call
    batch_wait_s: float = 0.01
    max_model_len: int | None = None  # None: the model config's own limit
    max_logprobs: int = 20
    dtype: str = "float32"
    kv_cache_gib: float = 1.0
    seed: int = 0
    num_gpus: float = 0  # per replica; 1 on a GPU cluster


class Guard:
    """ASGI middleware: bearer token on every path but ``/health``, and a hard cap on the request body.

    It runs before FastAPI parses anything, so an oversized or unauthenticated body is never buffered in full
    or decoded. The body is read here (at most ``max_body_bytes + one chunk``) and replayed to the app.
    """

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return await _reply(send, 401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                    [(b"www-authenticate", b"Bearer")])
        declared = headers.get("content-length", "")
        # not "²": isdigit()
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _reply(
                send, 413, f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await _reply(send, 413,
                                    f"request body exceeds the limit of {self.max_body_bytes} bytes")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        # JSON between systems is UTF-8 (RFC 8259); say so rather than FastAPI's "error parsing the body"
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await _reply(send, 400,
                                f"request body is not UTF-8: byte {e.start} ({body[e.start:e.start + 1]!r})")

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _reply(send, status: int, detail: str, extra_headers: list | None = None) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": payload})


async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI reports a body that is not JSON at all as a schema error (422); it is a malformed request (400).
    bad_json = [e for e in exc.errors() if e.get("type") == "json_invalid"]
    if bad_json:
        why = bad_json[0].get("ctx", {}).get("error", "JSON decode error")
        return JSONResponse(status_code=400, content={"detail": f"malformed JSON body: {why}"})
    return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})


def _json_safe(x):
    """Python's JSON parser takes NaN/Infinity (and 1e400 as inf); echoed back in a 422 they would make the
    reply itself invalid JSON (a 500), so they are echoed as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _refuse(problems: list[str]) -> None:
    if problems:
        raise HTTPException(status_code=400, detail="; ".join(problems))


@serve.ingress()
class TeacherServer:
    """One replica: a vLLM teacher engine plus the FastAPI app that fronts it (built per replica, see
    below)."""

    async def __init__(self, settings: ServerSettings):
        self.settings = settings
        # vLLM's in-process engine is not thread-safe and binds its CPU threads where it starts: one dedicated
        # thread builds it and runs every call, which also serialises what the event loop accepts
        # concurrently.
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-engine")
        self.teacher = await self._run(
            lambda: VLLMTeacher(settings.model_dir, seed=settings.seed, max_model_len=settings.max_model_len,
                                kv_cache_gib=settings.kv_cache_gib, dtype=settings.dtype,
                                max_logprobs=settings.max_logprobs)
        )
        self.vocab_size, self.max_model_len = self.teacher.limits()
        self._score_batch.set_max_batch_size(settings.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(settings.batch_wait_s)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[api.ScoreRequest]) -> list[list[api.SequenceScore]]:
        """Concurrent /v1/score (and /v1/reward) requests scored in one engine call, then split back."""
        flat = [s for r in requests for s in r.sequences]
        top_k = max(r.top_k for r in requests)
        rows = await self._run(self.teacher.score_tokens, [s.token_ids for s in flat],
                               [s.response_start for s in flat], top_k)
        out, i = [], 0
        for r in requests:
            mine, i = rows[i : i + len(r.sequences)], i + len(r.sequences)
            # Rows are sorted by rank, so the first k of the batch's top-K are exactly this request's top-k.
            out.append([
                api.SequenceScore(
                    logprobs=row.logprobs,
                    topk_ids=[ids[: r.top_k] for ids in row.topk_ids] if r.top_k else None,
                    topk_logprobs=[lps[: r.top_k] for lps in row.topk_logprobs] if r.top_k else None,
                )
                for row in mine
            ])
        return out

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Late-bound app (Serve calls this after __init__): the routes close over this replica, and the guard
        # gets the token without a module-level global.
        return build_app(self)


def build_app(server: TeacherServer) -> FastAPI:
    s = server.settings
    app = FastAPI(
        title="opd teacher", version="1",
        description=f"Teacher scoring server for on-policy distillation ({s.model_dir}). Every path but "
                    "/health needs `Authorization: Bearer TOKEN` when the server was started with a token.",
    )
    app.add_middleware(Guard, token=s.token, max_body_bytes=s.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    errors = {400: {"description": "malformed or non-UTF-8 JSON, or a request this model cannot take "
                                   "(the message names the field and row)"},
              401: {"description": "missing or wrong bearer token"}, 413: {"description": "body too large"}}
    base_openapi = app.openapi

    def openapi() -> dict:
        # Served from cache after the first call; published once with this replica's limits and the auth
        # scheme.
        fresh = app.openapi_schema is None
        schema = base_openapi()
        if fresh:
            api.publish_limits(schema, server.vocab_size, server.max_model_len, s.max_logprobs)
            if s.token:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, ops in schema["paths"].items():
                    for op in ops.values():
                        op["security"] = [] if path in OPEN_PATHS else [{"bearer": []}]
        return schema

    app.openapi = openapi

    @app.get("/health", response_model=api.Health)
    async def health() -> api.Health:
        return api.Health(status="ok", model=s.model_dir, vocab_size=server.vocab_size,
                          max_model_len=server.max_model_len, max_logprobs=s.max_logprobs)

    @app.post("/v1/score", response_model=api.ScoreResponse, responses=errors)
    async def score(req: api.ScoreRequest) -> api.ScoreResponse:
        """Teacher log-prob of every response token (``token_ids[response_start:]``), optional top-k per
        token."""
        _refuse(api.check_score(req, server.vocab_size, server.max_model_len, s.max_logprobs))
        return api.ScoreResponse(scores=await server._score_batch(req) if req.sequences else [])

    @app.post("/v1/generate", response_model=api.GenerateResponse, responses=errors)
    async def generate(req: api.GenerateRequest) -> api.GenerateResponse:
        """Greedy completion text of each prompt (evaluation measures the teacher's accuracy with it)."""
        _refuse(api.check_generate(req, server.vocab_size, server.max_model_len))
        texts = (await server._run(server.teacher.generate_greedy, req.prompts, req.max_tokens)
                 if req.prompts else [])
        return api.GenerateResponse(texts=texts)

    @app.post("/v1/reward", response_model=api.RewardResponse, responses=errors, description=REWARD_DOC)
    async def reward(req: api.RewardRequest) -> api.RewardResponse:
        _refuse(api.check_reward(req, server.vocab_size, server.max_model_len))
        seqs = [api.Sequence(token_ids=p + c, response_start=len(p))
                for p, c in zip(req.prompts, req.completions, strict=True)]
        scores = await server._score_batch(api.ScoreRequest(sequences=seqs)) if seqs else []
        return api.RewardResponse(rewards=[sum(x.logprobs) / len(x.logprobs) for x in scores])

    return app


def serve_forever(settings: ServerSettings, *, host: str, port: int, replicas: int,
                  address: str | None = None) -> None:
    """Start Ray (embedded unless ``address``), deploy ``replicas`` teacher replicas on ``host:port``, block
    until SIGTERM/SIGINT, then shut Serve and Ray down."""
    import ray

    from opd.rollout.engine import ACTOR_ENV

    if address:
        ray.init(address=address, runtime_env={"env_vars": ACTOR_ENV})
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, replicas), include_dashboard=False,
                 runtime_env={"env_vars": ACTOR_ENV})
    # Installed after ray.init, which sets its own SIGTERM handler: a stop request shuts Serve down cleanly.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        deployment = serve.deployment(TeacherServer).options(
            name="teacher", num_replicas=replicas,
            ray_actor_options={"num_cpus": 1, "num_gpus": settings.num_gpus},
            # Room for a full batch to queue while the previous one runs; beyond it Serve answers 503
            # (back-off).
            max_ongoing_requests=max(16, 2 * settings.max_batch_size),
        )
        serve.run(deployment.bind(settings), name=APP_NAME, route_prefix="/")
        print(f"opd serve-teacher: {settings.model_dir} on http://{host}:{port} ({replicas} replica(s)); "
              f"token {'required' if settings.token else 'off'}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
