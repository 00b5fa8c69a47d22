"""End-to-end on local Ray with the real vLLM engines, the real learner and the real verifier hosts."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from conftest import start_shared, stop_shared, tiny_overrides, train_on
from transformers import AutoModelForCausalLM

from opd.cluster import start_teachers
from opd.config import load_config
from opd.driver import run

pytestmark = pytest.mark.slow


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def opd_run(tiny_models, local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "opd2"
    summary = run(load_config(None, tiny_overrides(tiny_models, out)), progress=False)
    return out, summary


def test_opd_two_steps(opd_run, tiny_models):
    out, summary = opd_run
    assert summary["steps"] == 2 and summary["weight_version"] == 2 and summary["eval_prompts"] == 20
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    assert [r["weight_version"] for r in rows] == [1, 2]
    for r in rows:
        assert r["probe_max_diff"] < 1e-3  # the engine serves exactly the learner's weights
        assert r["learner_sampler_absdiff_max"] < 1e-3  # sampler logprobs are the policy's
        assert r["teacher_kl"] is not None and r["update_skipped"] == 0.0
        assert r["train_tokens"] > 0 and r["rollout_tokens_per_s"] > 0 and r["score_tokens_per_s"] > 0
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    final = out / "checkpoints" / "step_000002"
    assert (final / "model" / "config.json").is_file() and (final / "optimizer.pt").is_file()
    before, after = _weights(tiny_models / "student"), _weights(final / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before), "two OPD steps left the student unchanged"


OBJECTIVE_RUNS = {
    "grpo": {"algorithm": "grpo"},
    "exopd": {"algorithm": "exopd"},
    "sdpo": {"algorithm": "sdpo", "sdpo.top_k": 8, "sdpo.success_threshold": 0.0},
    "srpo": {"algorithm": "srpo", "sdpo.top_k": 8},
    "opd-tip50": {"selection.mode": "overconfident", "selection.keep_ratio": 0.5},
    "opd-paced": {"weighting.paced": "true"},
    "opd-topk": {"opd.divergence": "teacher_topk", "teacher.top_k": 5},
    "opd-full-vocab": {"opd.divergence": "full_vocab", "teacher.top_k": 0},
    "opd-full-vocab-teacher": {"opd.divergence": "full_vocab", "opd.full_vocab_source": "teacher"},
}


@pytest.fixture(scope="module")
def shared(tiny_models, local_ray, tmp_path_factory):
    """One rollout worker and one teacher engine for every objective's job (each job has its own learner)."""
    roles = start_shared(load_config(None, tiny_overrides(tiny_models, tmp_path_factory.mktemp("shared") / "shared")))
    yield roles
    stop_shared(roles)


@pytest.mark.parametrize("name", list(OBJECTIVE_RUNS))
def test_objective_two_steps(shared, tiny_models, tmp_path, name):
    out = tmp_path / name
    cfg = load_config(None, tiny_overrides(tiny_models, out, **OBJECTIVE_RUNS[name]))
    # The hidden-state teacher is a transformers engine of its own (teacher.engine=auto); the others share the vLLM one.
    teacher = start_teachers(cfg, prefix=f"{name}/") if cfg.teacher_sends_hidden else None
    try:
        summary = train_on(shared, cfg, teacher=teacher)
    finally:
        if teacher is not None:
            ray.kill(teacher.actors["default"])
    assert summary["steps"] == 2 and summary["weight_version"] >= 1
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["probe_max_diff"] < 1e-3 for r in rows)
    trained = [r for r in rows if not r["update_skipped"]]
    assert trained, f"{name}: no step updated the student"
    for r in trained:
        assert r["loss"] is not None and r["train_tokens"] > 0
    if name == "grpo":
        assert summary["teacher_accuracy"] is None and all("teacher_kl" not in r for r in rows)
    if name == "opd-full-vocab":  # the learner's teacher forward gives the KL; no teacher actor scored the samples
        assert all("teacher_kl" in r and "score_tokens_per_s" not in r for r in trained)
    if name == "opd-full-vocab-teacher":  # the teacher actor scored the samples and sent its hidden states
        assert all("score_tokens_per_s" in r and "teacher_kl" in r for r in rows)
    if name == "opd-tip50":
        assert all(r["train_tokens"] <= 0.5 * r["response_length"] * 8 + 1 for r in trained)


def test_resume_reproduces_uninterrupted_run(opd_run, tiny_models, local_ray, tmp_path):
    ref_dir, _ = opd_run
    out = tmp_path / "opd_resumed"
    mlflow = {"tracking.mlflow": True}  # the file store under the run dir; the resumed driver appends to the same run
    first = run(load_config(None, tiny_overrides(tiny_models, out, **mlflow, **{"trainer.total_steps": 1})), progress=False)
    assert first["steps"] == 1
    summary = run(load_config(None, tiny_overrides(tiny_models, out, **mlflow)), resume=True, progress=False)
    assert summary["steps"] == 2
    assert [r["step"] for r in _metrics(out)] == [0, 1]  # each step logged exactly once
    from mlflow.tracking import MlflowClient

    state = json.loads((out / "tracking.json").read_text())["mlflow"]
    history = MlflowClient(tracking_uri=state["tracking_uri"]).get_metric_history(state["run_id"], "teacher_kl")
    assert [m.step for m in history] == [0, 1]
    ref = _weights(ref_dir / "checkpoints" / "step_000002" / "model")
    got = _weights(out / "checkpoints" / "step_000002" / "model")
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"resumed weights differ from the uninterrupted run at {k}"


def test_resume_without_checkpoint_is_refused(tiny_models, tmp_path):
    from opd.config import ConfigError

    with pytest.raises(ConfigError, match="no complete checkpoint"):
        run(load_config(None, tiny_overrides(tiny_models, tmp_path / "none")), resume=True)


def test_opd_eval_cli(opd_run, tiny_models, local_ray, capsys):
    from opd.cli import main

    out, summary = opd_run
    final = out / "checkpoints" / "step_000002" / "model"
    # The run directory's config.yaml is a complete config: evaluating the final checkpoint reproduces the
    # summary's figures (the same greedy decoding on the same held-out prompts).
    assert main(["eval", str(out / "config.yaml"), f"models.student={final}", "--teacher"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval_prompts"] == 20
    assert result["student_accuracy"] == pytest.approx(summary["student_accuracy_after"])
    assert result["teacher_accuracy"] == pytest.approx(summary["teacher_accuracy"])
