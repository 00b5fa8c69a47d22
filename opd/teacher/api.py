"""The teacher server's JSON contract: pydantic request/response records and the checks a request must pass.

Shared by the server (``opd.teacher.server``, which publishes them as its OpenAPI schema) and the client
(``opd.teacher.http``). Pure pydantic: importable without Ray, FastAPI or vLLM, so the checks are unit-tested
alone.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# Pydantic schema errors answer 422 (FastAPI's default); everything below answers 400 with the message naming
# the field and row, because the request was well-formed JSON of the right shape but cannot be served by this
# model.


def _json_integer(v: object) -> object:
    """JSON Schema's "integer" (what ``/openapi.json`` promises): a number without a fractional part, 3 or
    3.0. Not
    ``true`` or ``"3"``, which pydantic's lax mode would otherwise read as ints (schemathesis caught
    ``true``)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError("must be a JSON integer")
    return v


Int = Annotated[int, BeforeValidator(_json_integer)]


class _Record(BaseModel):
    """Requests: an unknown field is a client mistake worth a 422, not something to ignore silently."""

    model_config = ConfigDict(extra="forbid")


class _Reply(BaseModel):
    """Replies: the client reads the fields it needs, so a server that adds fields stays compatible."""

    model_config = ConfigDict(extra="ignore")


class Sequence(_Record):
    token_ids: list[Int] = Field(description="prompt + response token ids of one sample")
    response_start: Int = Field(ge=1, description="index of the first response token (= prompt length, >= 1)")


class ScoreRequest(_Record):
    sequences: list[Sequence]
    top_k: Int = Field(0, ge=0,
                       description="also return the teacher's top-k (ids, logprobs) per response token")


class SequenceScore(_Reply):
    logprobs: list[float] = Field(description="teacher log-prob of each response token, in order")
    topk_ids: list[list[int]] | None = Field(None,
                                             description="[T][K] teacher top-k token ids; null when top_k=0")
    topk_logprobs: list[list[float]] | None = Field(None,
                                                    description="[T][K] their log-probs; null when top_k=0")


class ScoreResponse(_Reply):
    scores: list[SequenceScore]


class GenerateRequest(_Record):
    prompts: list[list[Int]] = Field(description="prompt token ids, one list per prompt")
    max_tokens: Int = Field(ge=1, description="new tokens per prompt (greedy decoding)")


class GenerateResponse(_Reply):
    texts: list[str]


class RewardRequest(_Record):
    prompts: list[list[Int]] = Field(description="prompt token ids, one list per completion")
    completions: list[list[Int]] = Field(description="completion token ids (non-empty), aligned with prompts")


class RewardResponse(_Reply):
    rewards: list[float] = Field(description="mean per-token teacher log-prob of each completion (<= 0)")


class Health(_Reply):
    status: str
    model: str
    vocab_size: int | None = None  # the limits requests are checked against (opd serve-teacher reports them)
    max_model_len: int | None = None
    max_logprobs: int | None = None


def check_token_rows(field: str, rows: list[list[int]], vocab_size: int, max_len: int) -> list[str]:
    """Problems with token-id rows: empty rows, ids outside ``[0, vocab_size)``, rows longer than ``max_len``.

    ``field`` names row ``i`` once formatted with it, e.g. ``"sequences[{}].token_ids"``.
    """
    problems = []
    for i, ids in enumerate(rows):
        name = field.format(i)
        if not ids:
            problems.append(f"{name}: empty")
            continue
        if len(ids) > max_len:
            problems.append(f"{name}: {len(ids)} tokens, more than this server takes ({max_len})")
        bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab_size), None)
        if bad is not None:
            problems.append(f"{name}[{bad}]: token id {ids[bad]} is outside the vocabulary [0, {vocab_size})")
    return problems


def check_score(req: ScoreRequest, vocab_size: int, max_model_len: int, max_logprobs: int) -> list[str]:
    # vLLM scores a sequence as a prompt that must leave room for one generated token: at most max_model_len -
    # 1.
    seqs = req.sequences
    problems = check_token_rows("sequences[{}].token_ids", [s.token_ids for s in seqs], vocab_size,
                                max_model_len - 1)
    for i, s in enumerate(seqs):
        if s.response_start > len(s.token_ids):
            problems.append(f"sequences[{i}].response_start: {s.response_start} is past the sequence end "
                            f"({len(s.token_ids)})")
    if req.top_k > max_logprobs:
        problems.append(f"top_k: {req.top_k} exceeds the server's --max-logprobs ({max_logprobs})")
    return problems


def check_generate(req: GenerateRequest, vocab_size: int, max_model_len: int) -> list[str]:
    problems = check_token_rows("prompts[{}]", req.prompts, vocab_size, max_model_len - 1)
    # the engine stops at max_model_len anyway; a bigger ask is a client bug
    if req.max_tokens > max_model_len:
        problems.append(f"max_tokens: {req.max_tokens} exceeds this server's max model length "
                        f"({max_model_len})")
    return problems


def check_reward(req: RewardRequest, vocab_size: int, max_model_len: int) -> list[str]:
    if len(req.prompts) != len(req.completions):
        return [f"completions: {len(req.completions)} completions for {len(req.prompts)} prompts"]
    problems = check_token_rows("prompts[{}]", req.prompts, vocab_size, max_model_len - 1)
    problems += check_token_rows("completions[{}]", req.completions, vocab_size, max_model_len - 1)
    for i, (p, c) in enumerate(zip(req.prompts, req.completions, strict=True)):
        if p and c and len(p) + len(c) > max_model_len - 1:
            problems.append(f"completions[{i}]: prompt + completion is {len(p) + len(c)} tokens, "
                            f"more than {max_model_len - 1}")
    return problems


def publish_limits(schema: dict, vocab_size: int, max_model_len: int, max_logprobs: int) -> dict:
    """The OpenAPI ``schema`` of these records, tightened in place with one server's limits (the checks
    above), so a client or fuzzer reading ``/openapi.json`` sees which ids, lengths and ``top_k`` this server
    takes. Limits that span fields (``response_start`` <= sequence length, prompt + completion length) stay in
    the checks alone."""
    models = schema.get("components", {}).get("schemas", {})
    row = {"type": "array", "minItems": 1, "maxItems": max_model_len - 1,
           "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}

    def tighten(model: str, field: str, **limits) -> None:
        if model in models:
            models[model]["properties"][field].update(limits)

    tighten("Sequence", "token_ids", **row)
    tighten("Sequence", "response_start", maximum=max_model_len - 1)
    tighten("ScoreRequest", "top_k", maximum=max_logprobs)
    tighten("GenerateRequest", "prompts", items=row)
    tighten("GenerateRequest", "max_tokens", maximum=max_model_len)
    tighten("RewardRequest", "prompts", items=row)
    tighten("RewardRequest", "completions", items=row)
    return schema
