"""benchmarks/vs_trl.py's TRL side on the tiny models: TRL trains on opd's prompt order with opd's schedule,
and the shared judge scores its checkpoint. (The whole comparison starts Ray and three vLLM engines: minutes,
not a test.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import answered_right, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "benchmarks" / "vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lr_schedule_is_opds():
    bench = _bench()
    assert [bench.lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert bench.lr_at(0, 2e-3, 0) == 2e-3


@pytest.mark.slow
def test_trl_trains_on_opds_prompt_order(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from opd.config import load_config
    from opd.data import PromptSource
    from opd.preflight import load_prompts

    bench = _bench()
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      tiny_overrides(tiny_models, tmp_path / "opd", **{"trainer.warmup_steps": 4}))
    schedule = bench.prompt_schedule(cfg, 2)
    # The schedule is the order opd's loop draws: a fresh PromptSource with the run's seed.
    from transformers import AutoTokenizer

    train, _ = load_prompts(cfg, AutoTokenizer.from_pretrained(cfg.models.student))
    source = PromptSource(train, cfg.run.seed)
    assert [[p.prompt_id for p in step] for step in schedule] == [
        [p.prompt_id for p, _ in source.next_batch(cfg.rollout.prompts_per_step)] for _ in range(2)
    ]
    g = cfg.rollout.group_size
    spec = {
        "student": cfg.models.student, "teacher": cfg.models.teacher, "steps": 2, "seed": 0,
        "batch": cfg.rollout.prompts_per_step * g, "max_new_tokens": cfg.rollout.max_new_tokens,
        "max_model_len": cfg.rollout.max_model_len, "kv_cache_gib": 1, "lr": 1e-2, "warmup": 4,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0, "grad_clip": 1.0, "torch_threads": 1, "beta": 1.0, "use_vllm": False,
        "run_dir": str(tmp_path / "trl"),
        "prompts": [p.columns["prompt"] for step in schedule for p in step for _ in range(g)],
    }
    result = bench.child_trl(spec)
    json.dumps(result)  # the child hands its result back as JSON
    assert len(result["step_seconds"]) == 2 and len(result["response_tokens"]) == 2
    assert result["final_lr"] == pytest.approx(bench.lr_at(2, 1e-2, 4))  # the rate of the next (third) step
    before = AutoModelForCausalLM.from_pretrained(cfg.models.student).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result["model_dir"]).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.models.teacher).eval()
    judged = bench.held_out(result["model_dir"], cfg, teacher)
    # The judge's batched transformers generate agrees with the HF engine's greedy answers, prompt by prompt.
    right = answered_right(result["model_dir"],
                           load_prompts(cfg, AutoTokenizer.from_pretrained(cfg.models.student))[1],
                           cfg.eval.max_new_tokens)
    assert judged["accuracy"] == sum(right) / len(right) and judged["eval_prompts"] == len(right)
    assert judged["teacher_kl"] > 0  # a tiny student a couple of steps in is far from its teacher
    assert bench.held_out(cfg.models.teacher, cfg, teacher)["teacher_kl"] == pytest.approx(0.0, abs=1e-5)
