"""The driver's named steps, each a thin call into the role actors. Feature branches live here, not in the loop."""

from __future__ import annotations

import logging

import ray

from opd.cluster import Roles
from opd.config import Config
from opd.rollout.stream import launch, split_even
from opd.trainer.routing import teacher_reverse_kl
from opd.types import Prompt, Rewards, RolloutBatch, Sample, TeacherScores

log = logging.getLogger("opd.steps")


def sample(roles: Roles, draws: list[tuple[Prompt, int]], step: int, cfg: Config) -> RolloutBatch:
    """One batch generated now (the synchronous path; ``RolloutStream`` runs ahead of the learner)."""
    return launch(roles.rollout, draws, step, cfg.rollout, cfg.run.seed).result()


def _score(roles: Roles, uids: list[str], prompts: list[Prompt], texts: list[str]) -> Rewards:
    """Verifiers get the dataset's prompt column and every other column as TRL-style keyword lists."""
    columns = {k: [p.columns[k] for p in prompts] for k in prompts[0].columns if k != "prompt"}
    return roles.verifiers.score(uids, [p.columns["prompt"] for p in prompts], texts, columns)


def _verify(roles: Roles, samples: list[Sample]) -> Rewards:
    return _score(roles, [s.uid for s in samples], [s.prompt for s in samples], [s.response_text for s in samples])


def verify_and_score(roles: Roles, rollouts: RolloutBatch, cfg: Config) -> tuple[Rewards, TeacherScores | None]:
    """Teacher scoring runs on its actor while verifiers run in their hosts; both finish before routing."""
    collect = roles.teacher.score(rollouts.samples, cfg.teacher.top_k) if roles.teacher else None
    rewards = _verify(roles, rollouts.samples)
    rewards.validate(rollouts.samples)
    scores = collect() if collect is not None else None
    return rewards, scores


def sync_weights(roles: Roles, probe_ids: list[int], tolerance: float) -> tuple[int, float]:
    """Publish the learner's weights to every rollout worker; each verifies them with the probe sequence."""
    version, expected, blob = ray.get(
        [roles.learner.version_number.remote(), roles.learner.probe_logprobs.remote(probe_ids), roles.learner.export_weights.remote()]
    )
    blob_ref = ray.put(blob)
    diffs = ray.get([w.load_weights.remote(blob_ref, version, probe_ids, expected, tolerance) for w in roles.rollout])
    return version, max(diffs)


def warm_up_verifiers(roles: Roles, prompt: Prompt) -> None:
    """Load the verifier functions in their hosts before any deadline applies (imports take seconds on a busy machine)."""
    _score(roles, ["warmup"], [prompt], [prompt.answer])


def evaluate(roles: Roles, prompts: list[Prompt], cfg: Config, who: str) -> float:
    """Greedy held-out accuracy (by the first verifier) of the student's engines or the teacher's."""
    ids = [p.token_ids for p in prompts]
    if who == "teacher":
        texts = roles.teacher.generate_greedy(prompts, cfg.eval.max_new_tokens)
    else:
        parts = [c for c in split_even(ids, len(roles.rollout)) if c]
        outs = ray.get([w.generate_greedy.remote(c, cfg.eval.max_new_tokens) for w, c in zip(roles.rollout, parts, strict=False)])
        texts = [t for part in outs for t in part]
    correct = _verify_all(roles, [f"eval/{p.prompt_id}" for p in prompts], prompts, texts)
    return sum(correct) / len(prompts)


def _verify_all(roles: Roles, uids: list[str], prompts: list[Prompt], texts: list[str], retries: int = 1) -> list[bool]:
    """Correctness of every row. A verifier failure (timeout on a loaded machine, crash) is retried, never counted
    as a wrong answer: an accuracy built on failed verifications would be a silent lie."""
    rewards = _score(roles, uids, prompts, texts)
    failed = [i for i, uid in enumerate(uids) if uid in rewards.failures]
    if not failed:
        return list(rewards.correct)
    if retries <= 0:
        first = rewards.failures[uids[failed[0]]]
        raise RuntimeError(f"evaluation: {len(failed)} of {len(uids)} rows could not be verified (first: {first})")
    log.warning("evaluation: %d rows failed verification (%s); retrying them", len(failed), rewards.failures[uids[failed[0]]])
    again = _verify_all(roles, [uids[i] for i in failed], [prompts[i] for i in failed], [texts[i] for i in failed], retries - 1)
    correct = list(rewards.correct)
    for i, ok in zip(failed, again, strict=True):
        correct[i] = ok
    return correct


def step_metrics(
    rollouts: RolloutBatch, rewards: Rewards, scores: TeacherScores | None, learner: dict, probe_diff: float,
    version: int, step_seconds: float,
) -> dict[str, float]:
    n_tok = rollouts.num_response_tokens
    m = {
        "reward": sum(rewards.rewards) / len(rewards.rewards),
        "accuracy": sum(rewards.correct) / len(rewards.correct),
        "verifier_failures": float(len(rewards.failures)),
        "response_length": n_tok / len(rollouts.samples),
        "rollout_tokens_per_s": n_tok / max(rollouts.generate_seconds, 1e-9),
        "verify_seconds": rewards.verify_seconds,
        "weight_version": float(version),
        "probe_max_diff": probe_diff,
        "step_seconds": step_seconds,
        **learner,
    }
    if scores is not None:
        m["teacher_kl"] = teacher_reverse_kl(rollouts, scores)
        m["score_tokens_per_s"] = n_tok / max(scores.score_seconds, 1e-9)
    return m
