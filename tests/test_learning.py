"""Learning tests: a short on-policy run of each objective on the tiny models must move its held-out signal the right
way, beyond that signal's noise. With the loss's sign flipped in the learner, all 52 tests of test_learner.py still
pass; every test here fails.

The run is the pipeline without Ray: the real rollout worker (``rollout.engine=hf``) samples from the learner's
current weights, the real teacher scores, a registered verifier rewards, the real router builds the batch and the
real Learner steps on it. Only the transport is skipped (weights go from learner to engine in-process).

The held-out signal is measured on the 100 test prompts the tiny models never trained on, 8 samples each at
temperature 1, with the same sampling seeds before and after. Its noise is the standard error over those prompts,
measured in each test: the improvement must exceed ``MARGIN`` times the before/after errors combined. Measured
(tiny models, 3 training seeds): the errors are 0.03-0.045 nats for the teacher KL (1.07 before), 0.013 for the
reward (0.77 before) and 0.044 for SDPO's self-teacher KL (3.12 before); at lr=0 the metrics' spread over 4 sampling
seeds is of the same size (1.01-1.08, 0.736-0.770, 3.10-3.13); the improvements are 7-130 times the errors.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics

import pytest
import torch

from opd.data import render_prompts
from opd.rewards.registry import resolve
from opd.rollout.worker import RolloutWorker
from opd.signal import TeacherSignal
from opd.tasks.bootstrap import task_splits, tiny_spec
from opd.teacher.scorer import VLLMTeacher
from opd.trainer.learner import Learner
from opd.trainer.objective import ObjectiveSpec
from opd.trainer.routing import RoutePlan, route
from opd.trainer.sdpo import build_reprompt
from opd.types import Prompt, Rewards, RolloutBatch, Sample

STEPS, PROMPTS, GROUP, MAX_NEW, LR = 40, 16, 4, 6, 3e-3  # lr 1e-2 diverges for sampled-token OPD on these models
HELD_OUT_SAMPLES, EVAL_SEED, MARGIN = 8, 1234, 4.0
# The reward the GRPO family must raise. exact_answer is right in ~1% of the tiny student's samples (the teacher's:
# 2%), too rare for a group to hold a success within a few steps; format_digits, the built-in shaping verifier, pays
# for a digits-only answer: 77% of the student's samples (the teacher's: 96%), so most groups hold both outcomes
# and there is room to rise.
REWARD = "format_digits"


@dataclasses.dataclass
class World:
    student: str
    teacher_dir: str
    train: list[Prompt]
    test: list[Prompt]
    worker: RolloutWorker
    teacher: VLLMTeacher

    def render(self, text: str) -> list[int]:
        return render_prompts([{"prompt": text, "answer": ""}], self.worker.engine.tokenizer, "reprompt")[0].token_ids


def _teacher(model_dir: str) -> VLLMTeacher:
    return VLLMTeacher(model_dir, seed=0, max_model_len=128, kv_cache_gib=0.0, dtype="float32", max_logprobs=20, engine="hf")


@pytest.fixture(scope="module")
def world(tiny_models) -> World:
    student, teacher = str(tiny_models / "student"), str(tiny_models / "teacher")
    worker = RolloutWorker(student, seed=0, max_model_len=128, kv_cache_gib=0.0, dtype="float32", engine="hf")
    splits = task_splits(tiny_spec().task)  # the split the tiny models were trained (train) and not trained (test) on
    tok = worker.engine.tokenizer
    return World(student, teacher, render_prompts(splits["train"].to_list(), tok, "train"),
                 render_prompts(splits["test"].to_list(), tok, "test"), worker, _teacher(teacher))


def _sync(world: World, learner: Learner) -> None:
    world.worker.engine.load_weights(learner.model.state_dict().items())


def _draw(world: World, prompts: list[Prompt], n: int, seed: int, epoch: int = 0) -> list[Sample]:
    samples, _ = world.worker.generate([(p, epoch) for p in prompts], n=n, temperature=1.0, top_p=1.0,
                                       max_tokens=MAX_NEW, seed=seed)
    return samples


def _verify(samples: list[Sample]) -> Rewards:
    scores = resolve(REWARD)([s.prompt.columns["prompt"] for s in samples], [s.response_text for s in samples],
                             answer=[s.prompt.answer for s in samples])
    return Rewards([s.uid for s in samples], [float(x) for x in scores], [x >= 1.0 for x in scores], {REWARD: list(scores)})


def _per_prompt(values: list[list[float]], n: int, tokens: bool) -> tuple[float, float]:
    """Mean and standard error over prompts of each prompt's mean (over its samples' tokens, or its samples)."""
    groups = [values[i : i + n] for i in range(0, len(values), n)]
    per = [sum(map(sum, g)) / sum(map(len, g)) if tokens else statistics.mean(x for v in g for x in v) for g in groups]
    return statistics.mean(per), statistics.stdev(per) / math.sqrt(len(per))


def _heldout_kl(world: World, learner: Learner, scorer: VLLMTeacher, context=None) -> tuple[float, float]:
    """Per-token KL(student || scorer) on held-out prompts: log q - log p over the student's own samples. ``context``
    gives the prompt the scorer reads instead (SDPO's self-teacher reads a re-prompt)."""
    _sync(world, learner)
    samples = _draw(world, world.test, HELD_OUT_SAMPLES, EVAL_SEED)
    scored = [dataclasses.replace(s, prompt=context(s.prompt)) for s in samples] if context else samples
    scores = scorer.score(scored)
    diffs = [[q - t for q, t in zip(s.sampler_logprobs, lp, strict=True)] for s, lp in zip(samples, scores.logprobs, strict=True)]
    return _per_prompt(diffs, HELD_OUT_SAMPLES, tokens=True)


def _heldout_reward(world: World, learner: Learner) -> tuple[float, float]:
    _sync(world, learner)
    rewards = _verify(_draw(world, world.test, HELD_OUT_SAMPLES, EVAL_SEED)).rewards
    return _per_prompt([[r] for r in rewards], HELD_OUT_SAMPLES, tokens=False)


def _train(world: World, learner: Learner, plan: RoutePlan, *, scored: bool, top_k: int = 0, seed: int = 0) -> None:
    """``STEPS`` synchronous steps of the pipeline: sample from the learner's weights, verify, score, route, learn."""
    rng = random.Random(seed)
    for step in range(STEPS):
        _sync(world, learner)
        samples = _draw(world, rng.sample(world.train, PROMPTS), GROUP, seed, epoch=step)
        scores = world.teacher.score(samples, top_k) if scored else None
        batch = route(RolloutBatch(step, samples, GROUP, step), _verify(samples), scores, plan, world.render)
        if batch is None:  # every group uniform: nothing to learn this step, as in the driver
            continue
        stats = learner.train_step(batch)
        assert stats["update_skipped"] == 0.0, f"step {step} skipped its update"
        assert stats["learner_sampler_absdiff_max"] < 1e-4  # on-policy: the engine served the learner's weights


def _learner(world: World, spec: ObjectiveSpec, seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    return Learner(world.student, lr=LR, objective=spec, teacher_dir=world.teacher_dir, seed=seed, micro_batch_size=64)


def _assert_moved(name: str, metric: str, before: tuple[float, float], after: tuple[float, float], sign: float) -> None:
    gain, noise = sign * (before[0] - after[0]), math.hypot(before[1], after[1])
    assert gain > MARGIN * noise, (
        f"{name}: held-out {metric} went {before[0]:.3f} ± {before[1]:.3f} -> {after[0]:.3f} ± {after[1]:.3f}; "
        f"it must {'fall' if sign > 0 else 'rise'} by more than {MARGIN} x {noise:.3f}")


# OPD family: held-out per-token KL(student || teacher) must fall. Measured before -> after (3 training seeds):
# opd 1.07 -> 0.43-0.50, opd-topk 1.07 -> 0.44-0.45, opd-full-vocab 1.07 -> 0.42-0.68 (7.3 errors on its worst seed),
# exopd 1.07 -> 0.43-0.50; with the loss's sign flipped they rise to 6.5, 4.3, 7.1 and 6.3.
KL_RUNS = {
    "opd": (ObjectiveSpec("opd"), RoutePlan("opd"), 0),
    "opd-topk": (ObjectiveSpec("opd", opd_divergence="teacher_topk"), RoutePlan("opd", signal=TeacherSignal("topk", "teacher", 20)), 20),
    # The learner runs the teacher itself (opd.full_vocab_source=learner): no teacher actor scores the batch.
    "opd-full-vocab": (ObjectiveSpec("opd", opd_divergence="full_vocab"), RoutePlan("opd"), None),
    "exopd": (ObjectiveSpec("exopd"), RoutePlan("exopd"), 0),
    # The teacher's term and format_digits' group advantage in one loss: the teacher's pull must still show.
    "opd_reward": (ObjectiveSpec("opd_reward"), RoutePlan("opd_reward"), 0),
}


@pytest.mark.parametrize("name", list(KL_RUNS))
def test_distillation_lowers_the_held_out_teacher_kl(world, name):
    spec, plan, top_k = KL_RUNS[name]
    learner = _learner(world, spec)
    before = _heldout_kl(world, learner, world.teacher)
    _train(world, learner, plan, scored=top_k is not None, top_k=top_k or 0)
    _assert_moved(name, "KL(student || teacher)", before, _heldout_kl(world, learner, world.teacher), sign=1.0)


# GRPO family: the held-out reward must rise. Measured (3 training seeds): grpo 0.77 -> 0.99-1.00, srpo 0.77 ->
# 0.94-0.95 (20 steps gave 0.81 on one seed: SRPO's SDPO branch pulls the failed samples towards a self-teacher that
# cannot read its re-prompt, see below, hence 40 steps); with the sign flipped both fall to 0.00.
REWARD_RUNS = {
    "grpo": (ObjectiveSpec("grpo"), RoutePlan("grpo")),
    "srpo": (ObjectiveSpec("srpo", sdpo_top_k=20), RoutePlan("srpo")),
}


@pytest.mark.parametrize("name", list(REWARD_RUNS))
def test_reinforcement_raises_the_held_out_reward(world, name):
    spec, plan = REWARD_RUNS[name]
    learner = _learner(world, spec)
    before = _heldout_reward(world, learner)
    _train(world, learner, plan, scored=False)
    _assert_moved(name, f"{REWARD} reward", before, _heldout_reward(world, learner), sign=-1.0)


def test_sdpo_distils_its_self_teacher_into_the_student(world):
    """SDPO learns from the student itself re-prompted with a successful answer. The tiny models never saw such a
    re-prompt and cannot use it: SDPO drives their reward down (0.77 -> 0.003 in 20 steps), a property of these
    models, not of the objective. What SDPO must still do is distil: the student answering the bare prompt moves
    towards the self-teacher reading the re-prompt, so the held-out KL(student(x) || self-teacher(reprompt(x)))
    falls. The yardstick is the starting self-teacher, fixed: the EMA self-teacher follows the student's weights, and
    the KL to it fell with the sign flipped too (3.1 -> 0.67 in 20 steps). Measured: 3.12 -> 0.01-0.33 (3 seeds);
    8.87 with the sign flipped."""
    learner = _learner(world, ObjectiveSpec("sdpo", sdpo_top_k=20))
    start = _teacher(world.student)  # the self-teacher before any step: the starting student

    def reprompt(p: Prompt) -> Prompt:
        ids = world.render(build_reprompt(p.columns["prompt"], p.answer, None))
        return dataclasses.replace(p, token_ids=ids)

    before = _heldout_kl(world, learner, start, reprompt)
    _train(world, learner, RoutePlan("sdpo"), scored=False)
    _assert_moved("sdpo", "KL(student || self-teacher)", before, _heldout_kl(world, learner, start, reprompt), sign=1.0)
