"""``opd serve-teacher`` as a real subprocess (its own Ray + Serve + vLLM), the HTTP client (retries up to a
deadline through a real flapping proxy), and a run against it."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import requests
import torch
from conftest import answered_right, tiny_overrides
from servers import TEACHER_MAX_BODY as MAX_BODY
from servers import TEACHER_MAX_LEN as MAX_LEN
from servers import TEACHER_TOKEN_ENV as TOKEN_ENV
from servers import FlakyProxy, free_port

from opd.config import ConfigError, load_config
from opd.preflight import check_model_dirs, load_prompts
from opd.teacher import api
from opd.teacher.http import HTTPTeacher, TeacherServerError
from opd.types import Prompt, Sample

pytest_plugins = ["teacher_fixture"]  # the session's one `teacher_server` (shared with test_teacher_fuzz.py)
FAST_RETRY = {"backoff_s": 0.02, "max_backoff_s": 0.2, "timeout_s": 5}


# ---- fast: request checks, config, client errors (no server) ----

def test_request_checks_name_field_and_row():
    req = api.ScoreRequest(sequences=[api.Sequence(token_ids=[1, 2, 3], response_start=1),
                                      api.Sequence(token_ids=[1, 200, 3], response_start=4)], top_k=30)
    problems = api.check_score(req, vocab_size=100, max_model_len=64, max_logprobs=20)
    assert problems == [
        "sequences[1].token_ids[1]: token id 200 is outside the vocabulary [0, 100)",
        "sequences[1].response_start: 4 is past the sequence end (3)",
        "top_k: 30 exceeds the server's --max-logprobs (20)",
    ]
    long = api.GenerateRequest(prompts=[[1] * 64], max_tokens=1)
    assert api.check_generate(long, 100, 64) == ["prompts[0]: 64 tokens, more than this server takes (63)"]
    assert api.check_reward(api.RewardRequest(prompts=[[1]], completions=[[]]), 100, 64) == [
        "completions[0]: empty"]
    assert api.check_generate(api.GenerateRequest(prompts=[[1]], max_tokens=65), 100, 64) == [
        "max_tokens: 65 exceeds this server's max model length (64)"]
    for not_int in (True, "1", 1.5):  # JSON Schema integers: 1 and 1.0, not true, "1" or 1.5
        with pytest.raises(ValueError, match="sequences.0.token_ids.1"):
            api.ScoreRequest.model_validate({"sequences": [{"token_ids": [1, not_int], "response_start": 1}]})
    assert api.ScoreRequest.model_validate(
        {"sequences": [{"token_ids": [1, 2.0], "response_start": 1}]}).sequences[0].token_ids == [1, 2]


def test_published_schema_carries_the_server_limits():
    from pydantic.json_schema import models_json_schema

    records = [(m, "validation") for m in (api.ScoreRequest, api.GenerateRequest, api.RewardRequest)]
    _, defs = models_json_schema(records, ref_template="#/components/schemas/{model}")
    schema = {"components": {"schemas": defs["$defs"]}}  # the shape FastAPI publishes them in
    models = api.publish_limits(schema, vocab_size=100, max_model_len=64,
                                max_logprobs=20)["components"]["schemas"]
    row = {"type": "array", "minItems": 1, "maxItems": 63,
           "items": {"type": "integer", "minimum": 0, "maximum": 99}}
    assert {k: models["Sequence"]["properties"]["token_ids"][k] for k in row} == row
    assert models["Sequence"]["properties"]["response_start"]["maximum"] == 63
    assert models["ScoreRequest"]["properties"]["top_k"]["maximum"] == 20
    assert models["GenerateRequest"]["properties"]["prompts"]["items"] == row
    assert models["GenerateRequest"]["properties"]["max_tokens"]["maximum"] == 64
    assert models["RewardRequest"]["properties"]["completions"]["items"] == row


def test_teacher_url_config(tiny_models, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="teacher.url: .*http://"):
        load_config(None, ["teacher.url=localhost:8000"])
    tok_only = tmp_path / "teacher_tok"
    tok_only.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tok_only / f).write_bytes((tiny_models / "teacher" / f).read_bytes())
    over = tiny_overrides(tiny_models, tmp_path / "run", **{"models.teacher": tok_only,
                                                           "teacher.url": "http://127.0.0.1:1",
                                                           "teacher.token_env": TOKEN_ENV})
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError,
                       match=f"teacher.token_env: environment variable '{TOKEN_ENV}' is not set"):
        check_model_dirs(load_config(None, over))
    monkeypatch.setenv(TOKEN_ENV, "x")
    check_model_dirs(load_config(None, over))  # a tokenizer-only teacher directory is enough with teacher.url
    # the HF forward needs weights
    with pytest.raises(ConfigError, match="models.teacher: .* has no config.json"):
        check_model_dirs(load_config(None, over + ["opd.divergence=full_vocab"]))


def _gave_up(exc: pytest.ExceptionInfo, url: str, last_error: str) -> int:
    """The attempts a TeacherServerError reports, after checking it names the URL, the time tried and the last
    error."""
    msg = str(exc.value)
    m = re.fullmatch(rf"teacher server {re.escape(url)}/health unreachable: gave up after [0-9.]+ s and "
                     rf"(\d+) attempts \(retry deadline 1 s, teacher.retry_deadline_s\); "
                     rf"last error: {last_error}.*", msg, flags=re.S)
    assert m, msg
    return int(m.group(1))


def test_client_retries_refused_connections_until_the_deadline():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: every attempt is refused
    with pytest.raises(TeacherServerError) as exc:
        HTTPTeacher(url, retry_deadline_s=1, **FAST_RETRY)
    assert _gave_up(exc, url, "ConnectionError") >= 3  # backed off and retried, not one try and out


def test_client_retries_5xx_until_the_deadline():
    with FlakyProxy(mode="503") as proxy:  # listening, but every answer is 503
        with pytest.raises(TeacherServerError) as exc:
            HTTPTeacher(proxy.url, retry_deadline_s=1, **FAST_RETRY)
    attempts = _gave_up(exc, proxy.url, "HTTP 503: proxy: teacher temporarily unavailable")
    assert attempts >= 3 and proxy.counts["503"] == attempts  # counted on the server side too


def test_public_host_without_token_is_refused(tiny_models, monkeypatch, capsys):
    from opd.cli import main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["serve-teacher", str(tiny_models / "teacher"), "--host", "0.0.0.0",
                 "--token-env", TOKEN_ENV]) == 2
    assert (f"refusing to serve beyond this machine without a token; set the environment variable {TOKEN_ENV}"
            in capsys.readouterr().err)


# ---- slow: the real server ----

def _samples(tok, texts: list[tuple[str, str]]) -> list[Sample]:
    out = []
    for i, (prompt, answer) in enumerate(texts):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(Sample(f"u{i}", Prompt(f"p{i}", prompt, p_ids, answer), 0, r_ids, answer,
                          [0.0] * len(r_ids), 0))
    return out


def _hf_scores(model_dir, samples: list[Sample]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.full_ids])
            logp_TV = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            p = len(s.prompt.token_ids)
            rows.append(logp_TV[p - 1 :])  # row j scores token j + 1: the response rows
    return rows


@pytest.mark.slow
def test_score_matches_hf_forward(teacher_server, tiny_models):
    from transformers import AutoTokenizer

    url, token = teacher_server
    tok = AutoTokenizer.from_pretrained(tiny_models / "teacher")
    samples = _samples(tok, [("12+34=", "64"), ("7+5=", "21"), ("99+1=", "001"), ("3+3=", "6")])
    teacher = HTTPTeacher(url, token)
    assert teacher.info.max_model_len == MAX_LEN and teacher.info.vocab_size == len(tok)
    got = teacher.score(samples, top_k=3)
    ref = _hf_scores(tiny_models / "teacher", samples)
    for s, lp, ids, lps, ref_TV in zip(samples, got.logprobs, got.topk_ids, got.topk_logprobs, ref,
                                       strict=True):
        want = ref_TV.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp), want, atol=1e-4), (lp, want)
        top_TK = ref_TV.topk(3, dim=-1)
        assert torch.allclose(torch.tensor(lps), top_TK.values, atol=1e-4)
        # tie-proof id check
        assert torch.allclose(ref_TV.gather(1, torch.tensor(ids)), top_TK.values, atol=1e-4)
    # The black-box reward is the mean of the same per-token log-probs.
    body = {"prompts": [s.prompt.token_ids for s in samples],
            "completions": [s.response_ids for s in samples]}
    r = requests.post(url + "/v1/reward", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200, r.text
    for reward, lp in zip(r.json()["rewards"], got.logprobs, strict=True):
        assert reward == pytest.approx(sum(lp) / len(lp), abs=1e-5)
    texts = teacher.generate_greedy([s.prompt.token_ids for s in samples], max_tokens=4)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


@pytest.mark.slow
def test_concurrent_requests_are_split_back_exactly(teacher_server, tiny_models):
    """Concurrent /v1/score requests with different top_k share engine batches; each gets exactly its own
    rows."""
    from concurrent.futures import ThreadPoolExecutor

    url, token = teacher_server
    seqs = [{"token_ids": [24, 25, 18, 26, 27, 36, 7 + i], "response_start": 6 - i % 3} for i in range(5)]

    def post(top_k: int) -> dict:
        body = {"sequences": seqs[top_k:], "top_k": top_k}
        r = requests.post(url + "/v1/score", json=body, headers={"Authorization": f"Bearer {token}"},
                          timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(post, [0, 3, 1, 2]))
    alone = post(0)["scores"]
    for top_k, reply in zip([0, 3, 1, 2], replies, strict=True):
        assert len(reply["scores"]) == len(seqs) - top_k
        for got, want in zip(reply["scores"], alone[top_k:], strict=True):
            assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-5)
            if top_k:
                assert all(len(row) == top_k for row in got["topk_ids"] + got["topk_logprobs"])
            else:
                assert got["topk_ids"] is None


@pytest.mark.slow
def test_auth_limits_and_bad_input(teacher_server):
    url, token = teacher_server
    auth = {"Authorization": f"Bearer {token}"}
    ok = {"sequences": [{"token_ids": [1, 2, 3], "response_start": 1}]}
    assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"  # open without a token
    assert requests.post(url + "/v1/score", json=ok, timeout=10).status_code == 401
    assert requests.post(url + "/v1/score", json=ok, headers={"Authorization": "Bearer nope"},
                         timeout=10).status_code == 401
    assert requests.get(url + "/openapi.json", timeout=10).status_code == 401
    assert requests.post(url + "/v1/score", json=ok, headers=auth, timeout=60).status_code == 200

    big = {"sequences": [{"token_ids": [1] * (MAX_BODY // 2), "response_start": 1}]}
    r = requests.post(url + "/v1/score", json=big, headers=auth, timeout=30)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
    r = requests.post(url + "/v1/score", data=b'{"sequences": [',
                      headers={**auth, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
    bad = {"sequences": [{"token_ids": [1, 2, 3], "response_start": 1},
                         {"token_ids": [1, 10**6, 3], "response_start": 1}]}
    r = requests.post(url + "/v1/score", json=bad, headers=auth, timeout=10)
    assert r.status_code == 400 and (
        "sequences[1].token_ids[1]: token id 1000000 is outside the vocabulary" in r.json()["detail"])
    long = {"prompts": [[1] * MAX_LEN], "max_tokens": 2}
    r = requests.post(url + "/v1/generate", json=long, headers=auth, timeout=10)
    assert r.status_code == 400 and "prompts[0]: 64 tokens" in r.json()["detail"]
    r = requests.post(url + "/v1/score", json={"sequences": [{"token_ids": [1]}]}, headers=auth, timeout=10)
    assert r.status_code == 422  # a schema error: FastAPI's answer, naming the missing field
    # Found by hand next to the fuzzing (these once answered 500): NaN/1e400 echoed back in the 422, and bad
    # UTF-8.
    for bad in (b'{"prompts": [[1]], "max_tokens": 1e400}', b'{"prompts": [[1]], "max_tokens": NaN}'):
        r = requests.post(url + "/v1/generate", data=bad,
                          headers={**auth, "Content-Type": "application/json"}, timeout=10)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_tokens"], r.text
    r = requests.post(url + "/v1/score", data=b'{"sequences": [], "x\xff": 1}',
                      headers={**auth, "Content-Type": "application/json"}, timeout=10)
    assert (r.status_code == 400
            and r.json()["detail"] == "request body is not UTF-8: byte 20 (b'\\xff')"), r.text
    r = requests.post(url + "/v1/generate", json={"prompts": [[1]], "max_tokens": MAX_LEN + 1},
                      headers=auth, timeout=10)
    assert r.status_code == 400 and f"max_tokens: {MAX_LEN + 1} exceeds" in r.json()["detail"]
    schema = requests.get(url + "/openapi.json", headers=auth, timeout=10).json()
    assert {"/health", "/v1/score", "/v1/generate", "/v1/reward"} <= set(schema["paths"])
    assert schema["paths"]["/v1/score"]["post"]["security"] == [{"bearer": []}]
    # --max-logprobs
    assert schema["components"]["schemas"]["ScoreRequest"]["properties"]["top_k"]["maximum"] == 20
    assert "mean per-token log-prob" in schema["paths"]["/v1/reward"]["post"]["description"]


def _wait_for(what: str, cond, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_client_rides_out_an_outage(teacher_server, tiny_models, caplog):
    """The server goes away (connections refused, then 503s) mid-call and comes back: the call completes with
    the same scores an uninterrupted call gets, every parallel request retried on its own."""
    from transformers import AutoTokenizer

    url, token = teacher_server
    tok = AutoTokenizer.from_pretrained(tiny_models / "teacher")
    samples = _samples(tok, [("12+34=", "46"), ("7+5=", "12"), ("99+1=", "100"), ("3+3=", "6"),
                             ("40+2=", "42")])
    want = HTTPTeacher(url, token).score(samples, top_k=2)
    with FlakyProxy(url) as proxy:
        client = HTTPTeacher(proxy.url, token, retry_deadline_s=120, sequences_per_request=2, **FAST_RETRY)
        proxy.set("refuse")
        result = {}
        call = threading.Thread(target=lambda: result.update(got=client.score(samples, top_k=2)))
        call.start()
        _wait_for("a refused attempt",
                  lambda: any("ConnectionError" in r.getMessage() for r in caplog.records))
        proxy.set("503")
        _wait_for("a 503 answer", lambda: proxy.counts["503"] >= 3)
        proxy.set("forward")
        call.join(120)
    assert not call.is_alive() and "got" in result, "the call did not finish once the server was back"
    got = result["got"]
    assert got.uids == want.uids and got.topk_ids == want.topk_ids
    assert (_flat(got.logprobs + got.topk_logprobs)
            == pytest.approx(_flat(want.logprobs + want.topk_logprobs), abs=1e-5))


def _flat(x: list) -> list[float]:
    return [v for item in x for v in (_flat(item) if isinstance(item, list) else [item])]


@pytest.mark.slow
def test_retry_deadline_reaches_the_teacher_actor(tiny_models, local_ray, tmp_path):
    """``teacher.retry_deadline_s`` from the config is the deadline of the pipeline's HTTP teacher actor."""
    from opd.cluster import start_teachers
    from opd.teacher.multi import DEFAULT

    url = f"http://127.0.0.1:{free_port()}"
    over = tiny_overrides(tiny_models, tmp_path / "run",
                          **{"teacher.url": url, "teacher.retry_deadline_s": 1})
    teachers = start_teachers(load_config(None, over))
    with pytest.raises(local_ray.exceptions.RayActorError,
                       match=r"unreachable: gave up after .* \(retry deadline 1 s"):
        local_ray.get(teachers.actors[DEFAULT].health.remote())


def _flap(proxy: FlakyProxy, stop: threading.Event) -> None:
    """Up 1.5 s, refusing connections 0.4 s, answering 503 0.4 s, over and over: a teacher restarting under
    load."""
    while not stop.is_set():
        for mode, seconds in (("forward", 1.5), ("refuse", 0.4), ("503", 0.4)):
            proxy.set(mode)
            if stop.wait(seconds):
                break
    proxy.set("forward")


@pytest.mark.slow
def test_opd_run_with_a_flapping_remote_teacher(teacher_server, tiny_models, local_ray, tmp_path,
                                                monkeypatch):
    """A whole tiny job against a remote teacher that keeps dropping out finishes, with every metric."""
    from transformers import AutoTokenizer

    from opd.driver import run

    url, token = teacher_server
    monkeypatch.setenv(TOKEN_ENV, token)
    out = tmp_path / "remote"
    stop = threading.Event()
    with FlakyProxy(url) as proxy:
        # on a fast machine the job may slip between the timed outages: make some certain
        proxy.fail_every = 3
        flapper = threading.Thread(target=_flap, args=(proxy, stop), daemon=True)
        flapper.start()
        cfg = load_config(None, tiny_overrides(tiny_models, out, **{"teacher.url": proxy.url,
                                                                   "teacher.token_env": TOKEN_ENV,
                                                                   "teacher.retry_deadline_s": 120}))
        try:
            summary = run(cfg, progress=False)
        finally:
            stop.set()
            flapper.join(10)
    assert proxy.counts["503"] > 0 and proxy.counts["forward"] > 0  # the job did meet the outages
    assert summary["steps"] == 2
    # The remote teacher's greedy answers through the flaps are the tiny teacher's own, recomputed on the HF
    # engine.
    held_out = load_prompts(cfg, AutoTokenizer.from_pretrained(cfg.models.student))[1]
    right = answered_right(tiny_models / "teacher", held_out, cfg.eval.max_new_tokens)
    assert summary["teacher_accuracy"] == sum(right) / len(right)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["teacher_kl"] is not None and r["score_tokens_per_s"] > 0 and r["update_skipped"] == 0.0
