"""End-to-end on local Ray with the real vLLM engines, the real learner and the real verifier hosts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import answered_right, tiny_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.config import load_config
from opd.driver import run
from opd.preflight import load_prompts

pytestmark = pytest.mark.slow


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_opd_two_steps(opd_run, tiny_models):
    out, summary = opd_run
    assert summary["steps"] == 2 and summary["weight_version"] == 2 and summary["eval_prompts"] == 20
    # Each accuracy is its own model's on the job's held-out prompts, recomputed here on the HF engine.
    cfg = load_config(None, tiny_overrides(tiny_models, out))
    held_out = load_prompts(cfg, AutoTokenizer.from_pretrained(cfg.models.student))[1]
    final = out / "checkpoints" / "step_000002"
    for key, model in (("teacher_accuracy", tiny_models / "teacher"),
                       ("student_accuracy_before", tiny_models / "student"),
                       ("student_accuracy_after", final / "model")):
        right = answered_right(model, held_out, cfg.eval.max_new_tokens)
        assert summary[key] == sum(right) / len(right), key
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    assert [r["weight_version"] for r in rows] == [1, 2]
    for r in rows:
        assert r["probe_max_diff"] < 1e-3  # the engine serves exactly the learner's weights
        assert r["learner_sampler_absdiff_max"] < 1e-3  # sampler logprobs are the policy's
        assert r["teacher_kl"] is not None and r["update_skipped"] == 0.0
        assert r["train_tokens"] > 0 and r["rollout_tokens_per_s"] > 0 and r["score_tokens_per_s"] > 0
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    assert (final / "model" / "config.json").is_file() and (final / "optimizer.pt").is_file()
    before, after = _weights(tiny_models / "student"), _weights(final / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before), (
        "two OPD steps left the student unchanged"
    )


EPISODES = {"agent.environment": f"{Path(__file__).parent / 'agent_envs.py'}:Counting", "agent.max_turns": 3,
            "agent.env_kwargs": "{role: user, note: '', answer_after: 2, system: false}",
            "rollout.max_model_len": 64, "run.log_samples": True, "eval.kl_samples": 0, "eval.num_prompts": 4}


def test_resume_with_episodes_is_bit_identical(tiny_models, local_ray, tmp_path):
    """Multi-turn episodes (a user environment by path; the tiny template has no tool role) stopped after one
    step and resumed: the second step's episodes are the same ids (digests, with environment segments between
    turns) and the weights after it equal the uninterrupted run's, bit for bit; each step is logged once, to
    the metrics file and to MLflow's run. (Single-turn resumes: tests/test_faults.py.)"""
    ref, out = tmp_path / "episodes", tmp_path / "episodes_resumed"
    run(load_config(None, tiny_overrides(tiny_models, ref, **EPISODES)), progress=False)
    # the file store under the run dir; the resumed driver appends to the same run
    mlflow = {"tracking.mlflow": True}
    first = tiny_overrides(tiny_models, out, **EPISODES, **mlflow, **{"trainer.total_steps": 1})
    run(load_config(None, first), progress=False)
    # The checkpoint's state as the first opd wrote it (no held-out teacher KL yet): it still resumes by name.
    state = out / "checkpoints" / "step_000001" / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items()
                                 if k != "teacher_kl_before"}))
    summary = run(load_config(None, tiny_overrides(tiny_models, out, **EPISODES, **mlflow)), resume=True,
                  progress=False)
    assert summary["steps"] == 2 and [r["step"] for r in _metrics(out)] == [0, 1]
    from mlflow.tracking import MlflowClient

    tracked = json.loads((out / "tracking.json").read_text())["mlflow"]
    history = MlflowClient(tracking_uri=tracked["tracking_uri"]).get_metric_history(tracked["run_id"],
                                                                                    "teacher_kl")
    assert [m.step for m in history] == [0, 1]
    samples = lambda o: [json.loads(ln) for ln in (o / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    step1 = lambda o: [(s["uid"], s["digest"]) for s in samples(o) if s["step"] == 1]  # noqa: E731
    assert len(step1(ref)) == 8 and step1(out) == step1(ref)
    assert any("environment" in [g["origin"] for g in s["segments"]] for s in samples(ref))
    a, b = (_weights(ref / "checkpoints" / "step_000002" / "model"),
            _weights(out / "checkpoints" / "step_000002" / "model"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed weights differ from the uninterrupted run at {k}"


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


def test_opd_eval_starts_the_engines_rollout_engine_names(opd_run, local_ray, monkeypatch, capsys):
    """``opd eval ... rollout.engine=hf`` builds its engines as a run does: transformers in the student's
    worker and in the teacher (``teacher.engine: auto`` follows it), and vLLM is never imported in either
    actor."""
    import sys

    import ray

    from opd import evaluation
    from opd.cli import main

    out, _ = opd_run
    seen, stop = {}, evaluation.stop_roles

    def look_then_stop(roles):
        look = lambda actor: ray.get(actor.__ray_call__.remote(  # noqa: E731
            lambda self: (type(self.engine).__name__, "vllm" in sys.modules)))
        seen.update(student=look(roles.rollout[0]), teacher=look(roles.teacher.actors["default"]))
        stop(roles)

    monkeypatch.setattr(evaluation, "stop_roles", look_then_stop)
    assert main(["eval", str(out / "config.yaml"), "rollout.engine=hf", "--teacher"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_prompts"] == 20
    assert seen == {"student": ("HFEngine", False), "teacher": ("HFEngine", False)}
