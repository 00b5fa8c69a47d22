"""HFEngine (``rollout.engine=hf``) against independent HF forwards and against the vLLM engine, on tiny
models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_overrides
from transformers import AutoModelForCausalLM

from opd.rollout.hf_engine import HFEngine
from opd.rollout.weight_sync import TRANSFER
from opd.rollout.worker import RolloutWorker, WeightSyncError

QUESTIONS = ["12+34=", "1+2=", "99+9=", "7+70="]


@pytest.fixture(scope="module")
def student(tiny_models):
    return str(tiny_models / "student")


@pytest.fixture(scope="module")
def engine(student):
    return HFEngine(student, max_model_len=32)


@pytest.fixture(scope="module")
def prompts(engine):
    tok = engine.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=False)
             for q in QUESTIONS]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def vllm_engine(student):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from opd.rollout.engine import VLLMEngine

    return VLLMEngine(student, max_model_len=32, enable_weight_sync=False)


def _forward_logprobs(model, prompt: list[int], response: list[int],
                      temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def _ids(outs):
    return [[g.token_ids for g in gens] for gens in outs]


def test_seeded_generation_is_reproducible(engine, prompts):
    kw = {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8}
    a = engine.generate(prompts, seeds=[1, 2, 3, 4], **kw)
    assert _ids(a) == _ids(engine.generate(prompts, seeds=[1, 2, 3, 4], **kw))
    # A prompt's samples depend on its seed, not on which other prompts share the batch.
    assert _ids(a[1:3]) == _ids(engine.generate(prompts[1:3], seeds=[2, 3], **kw))
    assert _ids(a) != _ids(engine.generate(prompts, seeds=[5, 6, 7, 8], **kw))
    assert len({tuple(g.token_ids) for gens in a for g in gens}) > 3, (
        "samples of different seeds/indices coincide")


def test_sampler_logprobs_equal_an_independent_forward(engine, prompts):
    outs = engine.generate(prompts, n=4, temperature=1.0, top_p=1.0, max_tokens=8, seeds=[0, 1, 2, 3])
    for p, gens in zip(prompts, outs, strict=True):
        for g in gens:
            assert len(g.logprobs) == len(g.token_ids) > 0
            ref = _forward_logprobs(engine.model, p, g.token_ids)
            assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-4), (g, ref)


def test_top_p_draws_from_the_nucleus_and_reports_raw_logprobs(engine, prompts):
    """vLLM's default logprobs_mode is raw_logprobs: the model's log-prob, before temperature and top-p."""
    outs = engine.generate(prompts, n=8, temperature=0.7, top_p=0.5, max_tokens=6, seeds=[9, 8, 7, 6])
    for p, gens in zip(prompts, outs, strict=True):
        for g in gens:
            assert torch.allclose(torch.tensor(g.logprobs), _forward_logprobs(engine.model, p, g.token_ids),
                                  atol=1e-4)
            for t, tok in enumerate(g.token_ids):
                with torch.no_grad():
                    logits = engine.model(torch.tensor([p + g.token_ids[:t]])).logits[0, -1].float()
                probs, order = torch.softmax(logits / 0.7, -1).sort(descending=True)
                nucleus = order[: int((probs.cumsum(-1) - probs < 0.5).sum())].tolist()
                assert tok in nucleus, f"token {tok} at step {t} is outside the top-p nucleus {nucleus}"


def test_eos_ends_a_sample_and_length_caps_it(engine, prompts):
    eos = engine.tokenizer.eos_token_id
    outs = engine.generate(prompts, n=8, temperature=1.0, top_p=1.0, max_tokens=3, seeds=[0, 1, 2, 3])
    reasons = set()
    for gens in outs:
        for g in gens:
            reasons.add(g.finish_reason)
            assert eos not in g.token_ids[:-1]
            if g.finish_reason == "stop":
                assert g.token_ids[-1] == eos and engine.tokenizer.eos_token not in g.text
            else:
                assert g.finish_reason == "length" and len(g.token_ids) == 3 and eos not in g.token_ids
    assert reasons == {"stop", "length"}  # these seeds give both; a regression in either path shows


def test_greedy_matches_vllm(engine, vllm_engine, prompts):
    kw = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 10}
    hf, vl = engine.generate(prompts, **kw), vllm_engine.generate(prompts, **kw)
    assert [(g.token_ids, g.text, g.finish_reason, g.logprobs) for gens in hf for g in gens] == [
        (g.token_ids, g.text, g.finish_reason, g.logprobs) for gens in vl for g in gens
    ]


def test_vllm_seeded_sampling_of_more_prompt_tokens_than_one_scheduler_step(vllm_engine, prompts):
    """Seeded sampling of a batch whose prefills need several scheduler steps (past max_num_batched_tokens):
    with chunked prefill vLLM rewinds a split request's seeded generator, which the CPU generator cannot
    do."""
    scheduler = vllm_engine.llm.llm_engine.vllm_config.scheduler_config
    long = [(p * 4)[:24] for p in prompts]  # max_model_len 32 leaves room for 4 new tokens
    many = [long[i % len(long)] for i in range(scheduler.max_num_batched_tokens // 24 + 8)]
    assert sum(map(len, many)) > scheduler.max_num_batched_tokens and len(many) <= scheduler.max_num_seqs
    outs = vllm_engine.generate(many, n=2, temperature=1.0, top_p=1.0, max_tokens=4,
                                seeds=list(range(len(many))))
    assert len(outs) == len(many) and all(len(g.token_ids) >= 1 for gens in outs for g in gens)
    # Per-request seeds: the same prompt and seed draw the same tokens wherever they sit in the batch.
    again = vllm_engine.generate(many[:3], n=2, temperature=1.0, top_p=1.0, max_tokens=4, seeds=[0, 1, 2])
    assert ([[g.token_ids for g in gens] for gens in again]
            == [[g.token_ids for g in gens] for gens in outs[:3]])


def test_scoring_from_a_start_scores_those_tokens_and_can_return_the_hidden_states(engine, prompts):
    """Scores from the response start on (the LM head runs there only) equal the rows of full scoring, and the
    hidden states returned are the decoder's final ones at the positions that predict those tokens."""
    seqs = [p + [24, 5, 7] for p in prompts]
    starts = [len(p) for p in prompts]
    full, part = engine.score(seqs, top_k=3), engine.score(seqs, top_k=3, starts=starts, hidden=True)
    for f, q, s, st in zip(full, part, seqs, starts, strict=True):
        assert len(q.token_logprobs) == 3 and q.topk_ids == f.topk_ids[st - 1 :]
        assert q.token_logprobs == pytest.approx(f.token_logprobs[st - 1 :], abs=1e-5)
        with torch.no_grad():
            h = engine.model.get_decoder()(torch.tensor([s])).last_hidden_state[0, st - 1 : -1]
        assert torch.allclose(torch.from_numpy(q.hidden), h, atol=1e-5)
    assert all(r.hidden is None for r in full)
    # Sequences that continue one prompt (a group's samples) run it once: the same scores as one at a time.
    grouped = [p + r for p in prompts for r in ([24, 5, 7], [9, 11])]
    starts = [len(p) for p in prompts for _ in range(2)]
    together = engine.score(grouped, top_k=3, starts=starts, hidden=True)
    for seq, st, got in zip(grouped, starts, together, strict=True):
        alone = engine.score([seq], top_k=3, starts=[st], hidden=True)[0]
        assert (got.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-5)
                and got.topk_ids == alone.topk_ids)
        assert torch.allclose(torch.from_numpy(got.hidden), torch.from_numpy(alone.hidden), atol=1e-5)


def test_score_matches_vllm(engine, vllm_engine, prompts):
    outs = engine.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=8, seeds=[4, 3, 2, 1])
    seqs = [p + g.token_ids for p, gens in zip(prompts, outs, strict=True) for g in gens]
    hf, vl = engine.score(seqs, top_k=3), vllm_engine.score(seqs, top_k=3)
    for h, v, s in zip(hf, vl, seqs, strict=True):
        assert len(h.token_logprobs) == len(s) - 1
        assert max(abs(a - b) for a, b in zip(h.token_logprobs, v.token_logprobs, strict=True)) < 1e-4
        assert h.topk_ids == v.topk_ids
        assert torch.allclose(torch.tensor(h.topk_logprobs), torch.tensor(v.topk_logprobs), atol=1e-4)
    assert all(r.topk_ids is None for r in engine.score(seqs[:2]))


@pytest.mark.slow
def test_weight_load_then_probe(student, prompts, local_ray):
    worker = RolloutWorker(student, seed=0, max_model_len=32, kv_cache_gib=1, dtype="float32", engine="hf")
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    probe = prompts[0] + [24, 5]
    expected = _forward_logprobs(model, probe[:1], probe[1:]).tolist()
    before = worker.engine.score([probe])[0].token_logprobs
    assert max(abs(a - b) for a, b in zip(before, expected, strict=True)) > 1e-2  # the perturbation shows
    diff = worker.load_weights(TRANSFER.publish(model.state_dict()), 1, probe, expected, 1e-3)
    assert diff < 1e-4 and worker.version == 1
    with pytest.raises(WeightSyncError, match="weight version 2 failed the probe check"):
        worker.load_weights(TRANSFER.publish(model.state_dict()), 2, probe, before, 1e-3)
    with pytest.raises(ValueError, match="does not match the rollout model"):
        worker.engine.load_weights(iter([("model.nonexistent.weight", torch.zeros(1))]))


def test_bad_input_names_the_limit(engine, prompts):
    with pytest.raises(ValueError, match="rollout.max_model_len=32"):
        engine.generate([prompts[0] * 5], n=1, temperature=1.0, top_p=1.0, max_tokens=4, seeds=[0])
    with pytest.raises(ValueError, match="2 seeds for 4 prompts"):
        engine.generate(prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=4, seeds=[0, 1])
    with pytest.raises(ValueError, match="rollout.engine='sglang'"):
        RolloutWorker("unused", seed=0, max_model_len=32, kv_cache_gib=1, dtype="float32", engine="sglang")


@pytest.mark.slow
def test_two_step_job_with_the_hf_engine(tiny_models, local_ray, tmp_path):
    from opd.config import load_config
    from opd.driver import run

    out = tmp_path / "hf2"
    summary = run(load_config(None, tiny_overrides(tiny_models, out, **{"rollout.engine": "hf"})),
                  progress=False)
    assert summary["steps"] == 2 and summary["weight_version"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["probe_max_diff"] < 1e-3
        assert r["learner_sampler_absdiff_max"] < 1e-3  # the hf sampler's logprobs are the learner's policy
        assert r["teacher_kl"] is not None and r["rollout_tokens_per_s"] > 0
