"""Two steps of every objective on local Ray with the real vLLM engines, the real learner and verifier hosts;
the jobs share one rollout worker and one teacher engine (each job has its own learner), which this module
releases before the next one starts its own."""

from __future__ import annotations

import json

import pytest
import ray
from conftest import start_shared, stop_shared, tiny_overrides, train_on

from opd.cluster import start_teachers, start_verifiers
from opd.config import load_config
from opd.trainer.objectives import DEFAULT, REGISTRY

pytestmark = pytest.mark.slow


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Objectives that learn from the spread of rewards inside a group are scored by format_digits (met by ~3/4 of
# the tiny student's answers): it answers 1 % right, so no group of the 2-step job held both a right and a
# wrong answer, and a step without signal moves nothing.
SPREAD = {"verifiers.functions": "[{name: format_digits}]"}
OBJECTIVE_RUNS = {
    "grpo": {"algorithm": "grpo", **SPREAD},
    "exopd": {"algorithm": "exopd"},
    "sdpo": {"algorithm": "sdpo", "sdpo.top_k": 8, "sdpo.success_threshold": 0.0},
    "srpo": {"algorithm": "srpo", "sdpo.top_k": 8, **SPREAD},
    "opd_reward": {"algorithm": "opd_reward", "opd.divergence": "sampled"},
    "grpo-kl_ref": {"algorithm": "grpo", "kl_ref.coef": 0.05, **SPREAD},
    "grpo-eval_teacher": {"algorithm": "grpo", "eval.teacher": "true", **SPREAD},
    "opd-tip50": {"selection.mode": "overconfident", "selection.keep_ratio": 0.5},
    "opd-paced": {"weighting.paced": "true", **SPREAD},
    "opd-topk": {"opd.divergence": "teacher_topk", "teacher.top_k": 5},
    "opd-full-vocab": {"opd.divergence": "full_vocab", "teacher.top_k": 0},
    "opd-full-vocab-teacher": {"opd.divergence": "full_vocab", "opd.full_vocab_source": "teacher"},
}
# Every registered objective runs here: one that none of the above runs (an objective added later) with its
# defaults.
OBJECTIVE_RUNS.update({name: {"algorithm": name} for name in REGISTRY
                       if name not in {run.get("algorithm", DEFAULT) for run in OBJECTIVE_RUNS.values()}})


@pytest.fixture(scope="module")
def shared(tiny_models, local_ray, tmp_path_factory):
    """One rollout worker and one teacher engine for every objective's job (each job has its own learner)."""
    roles = start_shared(load_config(None, tiny_overrides(tiny_models,
                                                          tmp_path_factory.mktemp("shared") / "shared")))
    yield roles
    stop_shared(roles)


@pytest.mark.parametrize("name", list(OBJECTIVE_RUNS))
def test_objective_two_steps(shared, tiny_models, tmp_path, name):
    out = tmp_path / name
    cfg = load_config(None, tiny_overrides(tiny_models, out, **OBJECTIVE_RUNS[name]))
    # The hidden-state teacher is a transformers engine of its own (teacher.engine=auto); the others share the
    # vLLM one.
    teacher = start_teachers(cfg, prefix=f"{name}/") if cfg.teacher_signal.hidden else None
    try:
        own = "verifiers.functions" in OBJECTIVE_RUNS[name]
        summary = train_on(shared, cfg, teacher=teacher, verifiers=start_verifiers(cfg) if own else None)
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
    if name == "opd_reward":  # the teacher scored every sample and the verifiers' rewards trained too
        assert all("teacher_kl" in r and "score_tokens_per_s" in r for r in rows)
    if name == "grpo":
        assert summary["teacher_accuracy"] is None and all("teacher_kl" not in r for r in rows)
    if name == "grpo-eval_teacher":  # the teacher answers the evaluation and scores its draws, never a step's
        assert summary["teacher_accuracy"] is not None
        assert summary["teacher_kl_before"] > 0 and summary["teacher_kl_after"] > 0
        assert all("teacher_kl" not in r and "score_tokens_per_s" not in r for r in rows)
    # the learner's teacher forward gives the KL; no teacher actor scored the samples
    if name == "opd-full-vocab":
        assert all("teacher_kl" in r and "score_tokens_per_s" not in r for r in trained)
    if name == "opd-full-vocab-teacher":  # the teacher actor scored the samples and sent its hidden states
        assert all("score_tokens_per_s" in r and "teacher_kl" in r for r in rows)
    if name == "opd-tip50":
        assert all(r["train_tokens"] <= 0.5 * r["response_length"] * 8 + 1 for r in trained)




def test_dynamic_sampling_trains_only_groups_whose_rewards_differ(shared, tiny_models, tmp_path):
    """DAPO's dynamic sampling on a real job: format_digits (met by ~3/4 of the tiny student's answers) leaves
    about two groups of three uniform, so each step draws extra prompts until 4 varied groups fill it. Every
    trained group's rewards differ, each step holds 4 groups, and the log says how many groups were generated
    for them."""
    out = tmp_path / "dapo"
    cfg = load_config(None, tiny_overrides(tiny_models, out, **{
        "algorithm": "grpo", "rollout.dynamic_sampling": "true", "rollout.max_resample_rounds": 8,
        "verifiers.functions": "[{name: format_digits}]", "run.log_samples": "true",
        "trainer.total_steps": 3}))
    summary = train_on(shared, cfg, verifiers=start_verifiers(cfg))
    assert summary["steps"] == 3
    rows = _metrics(out)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        step = [s for s in samples if s["step"] == r["step"]]
        groups: dict[str, set] = {}
        for s in step:
            groups.setdefault(s["prompt_id"], set()).add(s["reward"])
        assert len(groups) == 4 and len(step) == 8, (r["step"], groups)  # prompts_per_step groups of G=2
        assert all(len(rewards) > 1 for rewards in groups.values()), groups
        assert r["resample_rounds"] >= 0 and 0 < r["dynamic_kept_fraction"] <= 1
    # over the run some generated groups were uniform and dropped (a kept fraction of 1 everywhere means no
    # filter)
    assert min(r["dynamic_kept_fraction"] for r in rows) < 1 and max(r["resample_rounds"] for r in rows) >= 1
