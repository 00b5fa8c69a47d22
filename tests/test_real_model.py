"""The real pair: SmolLM2-135M-Instruct (49,152-token BPE vocabulary, ChatML template) as the teacher and a
student depth-pruned from it, both built by opd's own commands, through local Ray, the real vLLM engines and
the learner.

One rollout worker and one teacher engine serve every objective's two-step job in turn (each job has its own
learner and pushes its weights to the worker at its start, as any job does); engine start-up is the slow part
on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from conftest import SMOLLM2_STUDENT_LAYERS, start_shared, stop_shared, train_on
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.cluster import start_rollout_worker, start_teachers
from opd.config import load_config
from opd.preflight import load_prompts

pytestmark = pytest.mark.slow

def real_overrides(models: tuple[Path, Path], out: Path, **extra) -> list[str]:
    teacher, student = models
    base = {
        "run.name": out.name, "run.output_dir": str(out), "models.student": str(student),
        "models.teacher": str(teacher),
        "task.name": "word_problems", "task.num_train": 40, "task.num_test": 4, "eval.num_prompts": 4,
        "eval.max_new_tokens": 8, "eval.kl_samples": 1, "verifiers.functions": "[{name: math_answer}]",
        "rollout.prompts_per_step": 2, "rollout.group_size": 2, "rollout.max_new_tokens": 8,
        "rollout.max_model_len": 192,  # an episode's turns and observations (test_episodes_on_the_real_pair)
        "teacher.top_k": 5, "trainer.total_steps": 2, "trainer.lr": 1e-4, "trainer.micro_batch_size": 4,
        "checkpoint.every": 0, **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def shared(smollm2, local_ray, tmp_path_factory):
    """A rollout worker (vLLM, the student) and a teacher (vLLM) that every job of this module uses."""
    roles = start_shared(load_config(None, real_overrides(smollm2,
                                                          tmp_path_factory.mktemp("shared") / "real-shared")))
    yield roles
    stop_shared(roles)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_the_rendered_prompt_is_the_tokenizers_chat_template(smollm2):
    """What opd feeds the engines is exactly what the checkpoint's own chat template makes of the row (ChatML
    with SmolLM2's default system turn), tokenised as a whole: no second BOS, nothing dropped."""
    _, student = smollm2
    tok = AutoTokenizer.from_pretrained(student)
    cfg = load_config(None, real_overrides(smollm2, Path("unused")))
    train_prompts, test_prompts = load_prompts(cfg, tok)
    for p in train_prompts[:5] + test_prompts:
        want = tok.apply_chat_template([{"role": "user", "content": p.columns["prompt"]}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
        assert p.token_ids == list(want)
        assert p.text.startswith("<|im_start|>system\n") and p.text.endswith("<|im_start|>assistant\n")
        assert tok.decode(p.token_ids) == p.text


def test_the_pruned_student_holds_the_kept_layers(smollm2):
    teacher_dir, student_dir = smollm2
    teacher, student = _weights(teacher_dir), _weights(student_dir)
    assert AutoModelForCausalLM.from_pretrained(student_dir).config.num_hidden_layers == 2
    for new, old in enumerate(int(x) for x in SMOLLM2_STUDENT_LAYERS.split(",")):
        for key in (k for k in student if k.startswith(f"model.layers.{new}.")):
            assert torch.equal(student[key], teacher[key.replace(f"layers.{new}.", f"layers.{old}.")]), key
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(student[key], teacher[key])


OBJECTIVES = {
    "sampled": {"opd.divergence": "sampled"},
    "topk": {"opd.divergence": "teacher_topk"},
    "full-vocab": {"opd.divergence": "full_vocab"},
}


@pytest.fixture(scope="module")
def real_runs(shared, smollm2, tmp_path_factory):
    """Each objective's two-step job, run once (on first use) and shared by the tests that read it."""
    done: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in done:
            out = tmp_path_factory.mktemp("real") / f"real-{name}"
            done[name] = out, train_on(shared, load_config(None, real_overrides(smollm2, out,
                                                                                **OBJECTIVES[name])))
        return done[name]

    return get


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_two_steps_on_the_real_pair(real_runs, smollm2, name):
    out, summary = real_runs(name)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1] and summary["weight_version"] == 2
    for r in rows:
        # the learner's weights, to the rounding of two float32 kernels (~1e-4 here)
        assert r["probe_max_diff"] < 5e-4
        assert r["learner_sampler_absdiff_max"] < 1e-3  # vLLM's sampler log-probs are the learner's policy
        assert r["update_skipped"] == 0.0 and torch.isfinite(torch.tensor(r["loss"]))
    assert all(r["teacher_kl"] > 0 for r in rows)
    assert summary["teacher_kl_before"] > 0 and summary["teacher_kl_after"] > 0
    before, after = _weights(smollm2[1]), _weights(out / "checkpoints" / "step_000002" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before), (
        f"{name}: two steps left the student unchanged")


def test_full_vocab_from_the_teacher_actors_hidden_states(shared, smollm2, tmp_path):
    """opd.full_vocab_source=teacher on the real pair: a transformers teacher actor runs the 135M trunk and
    sends 576 floats per token instead of 49,152; the learner applies the teacher's LM head."""
    out = tmp_path / "real-hidden"
    cfg = load_config(None, real_overrides(smollm2, out, **{"opd.divergence": "full_vocab",
                                                            "opd.full_vocab_source": "teacher"}))
    assert cfg.teacher_engine == "hf"
    teacher = start_teachers(cfg, prefix="real-hidden/")
    try:
        summary = train_on(shared, cfg, teacher=teacher)
    finally:
        ray.kill(teacher.actors["default"])
    rows = _metrics(out)
    assert summary["steps"] == 2 and all(r["teacher_kl"] > 0 and r["update_skipped"] == 0.0 for r in rows)


def test_lora_on_the_real_pair(shared, smollm2, tmp_path):
    """A LoRA adapter trained on the real student and served unmerged by a LoRA-enabled vLLM engine."""
    out = tmp_path / "real-lora"
    cfg = load_config(None, real_overrides(smollm2, out, **{"lora.r": 8, "trainer.lr": 1e-3}))
    worker = start_rollout_worker(cfg, 0)
    try:
        summary = train_on(shared, cfg, rollout=[worker])
    finally:
        ray.kill(worker)
    rows = _metrics(out)
    assert summary["steps"] == 2 and all(r["probe_max_diff"] < 5e-4 for r in rows)
    adapter = out / "checkpoints" / "step_000002" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()


def _episode_cfg(smollm2, out: Path, **extra):
    teacher, _ = smollm2
    return load_config(None, real_overrides((teacher, teacher), out, **{
        "agent.environment": f"{Path(__file__).parent / 'agent_envs.py'}:Counting", "agent.max_turns": 2,
        "rollout.max_new_tokens": 32, "rollout.prompts_per_step": 4, "run.log_samples": True,
        "opd.divergence": "sampled", "eval.kl_samples": 0, **extra}))


@pytest.fixture(scope="module")
def episode_run(shared, smollm2, tmp_path_factory):
    """The episode job's rollout worker and its two-step run. The student is the instruct model
    itself (the pruned one rarely ends a turn within its budget, and a turn cut by it ends the episode); the
    teacher is the shared vLLM one."""
    out = tmp_path_factory.mktemp("real") / "real-episodes"
    cfg = _episode_cfg(smollm2, out)
    worker = start_rollout_worker(cfg, 0, prefix="real-episodes/")
    summary = train_on(shared, cfg, rollout=[worker])
    yield worker, out, summary
    ray.kill(worker)


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_episodes_on_the_real_pair(episode_run, smollm2):
    """Multi-turn episodes through local Ray, vLLM and the learner, with a user environment loaded by path
    that answers every turn. One ledger of ids from sampler to learner: vLLM continued each turn from the
    ledger's ids (the learner's log-probs of the sampled tokens are vLLM's, to kernel rounding, which they are
    not if any id before them differs); the teacher and the learner were handed ids whose digest is the
    ledger's (``Sample.checked_ids`` raises otherwise); samples.jsonl holds each segment with its origin."""
    from opd.agents.metrics import HELD_OUT
    from opd.types import ids_digest

    _, out, summary = episode_run
    rows = _metrics(out)
    assert summary["steps"] == 2
    # the held-out figures of greedy episodes, the student's before and after and the teacher's
    for k in ("student_episodes_before", "student_episodes_after", "teacher_episodes"):
        assert set(summary[k]) == set(HELD_OUT) and 1 <= summary[k]["turns"] <= 2, (k, summary[k])
    for r in rows:
        assert r["learner_sampler_absdiff_max"] < 1e-3 and r["probe_max_diff"] < 5e-4
        assert r["update_skipped"] == 0.0 and r["drift_rate"] == 0.0
        # the environment never ends an episode: a turn cut at its budget does, or the limits
        assert sum(r[f"stop_{k}"] for k in ("max_turns", "context_full", "length")) == 1.0
    samples = _samples(out)
    assert len(samples) == 16 and all(s["trained"] for s in samples)
    # about a third of this model's turns end within 32 tokens: some episodes go on (1 - 0.65**16)
    assert any(s["turns"] > 1 for s in samples)
    assert any("teacher_kl_after_observation" in r for r in rows)
    tok = AutoTokenizer.from_pretrained(smollm2[0])
    for s in samples:
        ids = s["prompt_ids"] + [t for seg in s["segments"] for t in seg["ids"]]
        assert ids_digest(ids) == s["digest"] and len(ids) <= 192
        origins = [seg["origin"] for seg in s["segments"]]
        assert origins[0] == "sampled" and origins.count("sampled") == s["turns"]
        if s["turns"] > 1:  # the observations: the environment's text, tokenised as the template's delta
            assert "environment" in origins and "template" in origins
            text = tok.decode([t for seg in s["segments"] if seg["origin"] == "environment"
                               for t in seg["ids"]])
            assert "characters. Answer in a few words." in text
            assert s["reward"] >= 0.25  # the environment's reward is part of the episode's

