"""``opd serve-teacher`` as a real subprocess (its own Ray + Serve + vLLM), the HTTP client, and a run against it."""

from __future__ import annotations

import json
import secrets
import sys
import time

import pytest
import requests
import torch
from conftest import tiny_overrides
from servers import clean_env, free_port, group_alive, start, stop_group, tail

from opd.config import ConfigError, check_model_dirs, load_config
from opd.teacher import api
from opd.teacher.http import HTTPTeacher, TeacherServerError
from opd.types import Prompt, Sample

TOKEN_ENV = "OPD_TEST_TEACHER_TOKEN"
MAX_BODY = 200_000
MAX_LEN = 64


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
    assert api.check_reward(api.RewardRequest(prompts=[[1]], completions=[[]]), 100, 64) == ["completions[0]: empty"]


def test_teacher_url_config(tiny_models, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="teacher.url: .*http://"):
        load_config(None, ["teacher.url=localhost:8000"])
    tok_only = tmp_path / "teacher_tok"
    tok_only.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tok_only / f).write_bytes((tiny_models / "teacher" / f).read_bytes())
    over = tiny_overrides(tiny_models, tmp_path / "run", **{"models.teacher": tok_only, "teacher.url": "http://127.0.0.1:1",
                                                           "teacher.token_env": TOKEN_ENV})
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"teacher.token_env: environment variable '{TOKEN_ENV}' is not set"):
        check_model_dirs(load_config(None, over))
    monkeypatch.setenv(TOKEN_ENV, "x")
    check_model_dirs(load_config(None, over))  # a tokenizer-only teacher directory is enough with teacher.url
    with pytest.raises(ConfigError, match="models.teacher: .* has no config.json"):  # the HF forward needs weights
        check_model_dirs(load_config(None, over + ["opd.divergence=full_vocab"]))


def test_client_names_unreachable_url():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(TeacherServerError, match=f"teacher server {url}/health unreachable after 3 attempts"):
        HTTPTeacher(url, retries=2, backoff_s=0.05, timeout_s=2)
    assert time.perf_counter() - t0 < 10


def test_public_host_without_token_is_refused(tiny_models, monkeypatch, capsys):
    from opd.cli import main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["serve-teacher", str(tiny_models / "teacher"), "--host", "0.0.0.0", "--token-env", TOKEN_ENV]) == 2
    assert f"refusing to serve beyond this machine without a token; set the environment variable {TOKEN_ENV}" in capsys.readouterr().err


# ---- slow: the real server ----

@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    port, token = free_port(), secrets.token_hex(8)
    log = tmp_path_factory.mktemp("serve") / "serve-teacher.log"
    cmd = [sys.executable, "-m", "opd.cli", "serve-teacher", str(tiny_models / "teacher"), "--port", str(port),
           "--token-env", TOKEN_ENV, "--max-model-len", str(MAX_LEN), "--max-body-bytes", str(MAX_BODY)]
    proc = start(cmd, log, clean_env(**{TOKEN_ENV: token}))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, f"serve-teacher exited with {proc.returncode}:\n{tail(log)}"
            assert time.time() < deadline, f"serve-teacher not healthy after 600 s:\n{tail(log)}"
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass  # not listening yet, or the proxy holds the request until the app is deployed
            time.sleep(2)
        yield url, token
    finally:
        stop_group(proc)
        assert not group_alive(proc.pid), "serve-teacher left processes behind"


def _samples(tok, texts: list[tuple[str, str]]) -> list[Sample]:
    out = []
    for i, (prompt, answer) in enumerate(texts):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(Sample(f"u{i}", Prompt(f"p{i}", prompt, p_ids, answer), 0, r_ids, answer, [0.0] * len(r_ids), 0))
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
def test_score_matches_hf_forward(server, tiny_models):
    from transformers import AutoTokenizer

    url, token = server
    tok = AutoTokenizer.from_pretrained(tiny_models / "teacher")
    samples = _samples(tok, [("12+34=", "64"), ("7+5=", "21"), ("99+1=", "001"), ("3+3=", "6")])
    teacher = HTTPTeacher(url, token)
    assert teacher.info.max_model_len == MAX_LEN and teacher.info.vocab_size == len(tok)
    got = teacher.score(samples, top_k=3)
    ref = _hf_scores(tiny_models / "teacher", samples)
    for s, lp, ids, lps, ref_TV in zip(samples, got.logprobs, got.topk_ids, got.topk_logprobs, ref, strict=True):
        want = ref_TV.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp), want, atol=1e-4), (lp, want)
        top_TK = ref_TV.topk(3, dim=-1)
        assert torch.allclose(torch.tensor(lps), top_TK.values, atol=1e-4)
        assert torch.allclose(ref_TV.gather(1, torch.tensor(ids)), top_TK.values, atol=1e-4)  # tie-proof id check
    # The black-box reward is the mean of the same per-token log-probs.
    body = {"prompts": [s.prompt.token_ids for s in samples], "completions": [s.response_ids for s in samples]}
    r = requests.post(url + "/v1/reward", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200, r.text
    for reward, lp in zip(r.json()["rewards"], got.logprobs, strict=True):
        assert reward == pytest.approx(sum(lp) / len(lp), abs=1e-5)
    texts = teacher.generate_greedy([s.prompt.token_ids for s in samples], max_tokens=4)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


@pytest.mark.slow
def test_concurrent_requests_are_split_back_exactly(server, tiny_models):
    """Concurrent /v1/score requests with different top_k share engine batches; each gets exactly its own rows."""
    from concurrent.futures import ThreadPoolExecutor

    url, token = server
    seqs = [{"token_ids": [24, 25, 18, 26, 27, 36, 7 + i], "response_start": 6 - i % 3} for i in range(5)]

    def post(top_k: int) -> dict:
        body = {"sequences": seqs[top_k:], "top_k": top_k}
        r = requests.post(url + "/v1/score", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
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
def test_auth_limits_and_bad_input(server):
    url, token = server
    auth = {"Authorization": f"Bearer {token}"}
    ok = {"sequences": [{"token_ids": [1, 2, 3], "response_start": 1}]}
    assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"  # open without a token
    assert requests.post(url + "/v1/score", json=ok, timeout=10).status_code == 401
    assert requests.post(url + "/v1/score", json=ok, headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    assert requests.get(url + "/openapi.json", timeout=10).status_code == 401
    assert requests.post(url + "/v1/score", json=ok, headers=auth, timeout=60).status_code == 200

    big = {"sequences": [{"token_ids": [1] * (MAX_BODY // 2), "response_start": 1}]}
    r = requests.post(url + "/v1/score", json=big, headers=auth, timeout=30)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
    r = requests.post(url + "/v1/score", data=b'{"sequences": [', headers={**auth, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
    bad = {"sequences": [{"token_ids": [1, 2, 3], "response_start": 1}, {"token_ids": [1, 10**6, 3], "response_start": 1}]}
    r = requests.post(url + "/v1/score", json=bad, headers=auth, timeout=10)
    assert r.status_code == 400 and "sequences[1].token_ids[1]: token id 1000000 is outside the vocabulary" in r.json()["detail"]
    long = {"prompts": [[1] * MAX_LEN], "max_tokens": 2}
    r = requests.post(url + "/v1/generate", json=long, headers=auth, timeout=10)
    assert r.status_code == 400 and "prompts[0]: 64 tokens" in r.json()["detail"]
    r = requests.post(url + "/v1/score", json={"sequences": [{"token_ids": [1]}]}, headers=auth, timeout=10)
    assert r.status_code == 422  # a schema error: FastAPI's answer, naming the missing field
    schema = requests.get(url + "/openapi.json", headers=auth, timeout=10).json()
    assert {"/health", "/v1/score", "/v1/generate", "/v1/reward"} <= set(schema["paths"])
    assert "mean per-token log-prob" in schema["paths"]["/v1/reward"]["post"]["description"]


@pytest.mark.slow
def test_opd_run_with_remote_teacher(server, tiny_models, local_ray, tmp_path, monkeypatch):
    from opd.driver import run

    url, token = server
    monkeypatch.setenv(TOKEN_ENV, token)
    out = tmp_path / "remote"
    cfg = load_config(None, tiny_overrides(tiny_models, out, **{"teacher.url": url, "teacher.token_env": TOKEN_ENV}))
    summary = run(cfg, progress=False)
    assert summary["steps"] == 2 and 0.0 <= summary["teacher_accuracy"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["teacher_kl"] is not None and r["score_tokens_per_s"] > 0 and r["update_skipped"] == 0.0
