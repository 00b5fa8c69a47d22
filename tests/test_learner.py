"""The learner on every objective, driven directly (no Ray, no vLLM) on the tiny checkpoint.

The key property: gradient accumulation over micro-batches gives the same update as one full batch, for every
objective and its denominator (token-mean, SDPO-routed tokens only, SRPO's shared denominator, TIP kept tokens).
"""

from __future__ import annotations

import random

import pytest
import torch

from opd.trainer.learner import Learner
from opd.trainer.objective import ObjectiveSpec
from opd.types import TrainBatch

SPECS = {
    "opd": ObjectiveSpec("opd"),
    "grpo": ObjectiveSpec("grpo"),
    "grpo-seq-mean": ObjectiveSpec("grpo", agg="seq-mean-token-mean"),
    "exopd": ObjectiveSpec("exopd", exopd_lam=1.25),
    "opd-topk": ObjectiveSpec("opd", opd_divergence="teacher_topk"),
    "opd-full-vocab-jsd": ObjectiveSpec("opd", opd_divergence="full_vocab", full_vocab_kind="jsd"),
    "sdpo": ObjectiveSpec("sdpo", sdpo_top_k=8),
    "srpo": ObjectiveSpec("srpo", sdpo_top_k=8),
}


def _batch(learner: Learner, name: str, n: int = 6, seed: int = 0) -> TrainBatch:
    rng = random.Random(seed)
    prompts = [[rng.randrange(6, 90) for _ in range(rng.randint(3, 6))] for _ in range(n)]
    responses = [[rng.randrange(6, 90) for _ in range(rng.randint(1, 4))] for _ in range(n)]
    sampler = [learner.probe_logprobs(p + r)[len(p) - 1 :] for p, r in zip(prompts, responses, strict=True)]
    teacher = [[x - rng.uniform(-1, 1) for x in s] for s in sampler]
    adv = [[-(s - t) for s, t in zip(srow, trow, strict=True)] for srow, trow in zip(sampler, teacher, strict=True)]
    k = 4
    topk_ids = [[[rng.randrange(6, 90) for _ in range(k)] for _ in r] for r in responses]
    topk_lp = [[sorted((rng.uniform(-6, -1) for _ in range(k)), reverse=True) for _ in r] for r in responses]
    spec = SPECS[name]
    sd = spec.name in ("sdpo", "srpo")
    return TrainBatch(
        uids=[f"u{i}" for i in range(n)], prompt_ids=prompts, response_ids=responses, sampler_logprobs=sampler,
        advantages=adv if spec.name != "grpo" else [[(-1) ** i * 0.7] * len(r) for i, r in enumerate(responses)],
        teacher_logprobs=teacher, objective=spec.name, loss_weights=[1.0, 0.5, 2.0, 1.0, 0.0, 1.0][:n],
        teacher_topk_ids=topk_ids if spec.opd_divergence == "teacher_topk" else None,
        teacher_topk_logprobs=topk_lp if spec.opd_divergence == "teacher_topk" else None,
        teacher_prompt_ids=[(p + [30, 31, 32] if i % 3 else None) for i, p in enumerate(prompts)] if sd else None,
        routes=[("sdpo" if i % 3 else ("none" if spec.name == "sdpo" else "grpo")) for i in range(n)] if sd else None,
    )


def _step(models, name, micro, spec=None):
    torch.manual_seed(0)
    student = str(models / "student")
    learner = Learner(student, lr=1e-2, micro_batch_size=micro, objective=spec or SPECS[name], teacher_dir=str(models / "teacher"))
    stats = learner.train_step(_batch(learner, name))
    return learner, stats


@pytest.mark.parametrize("name", list(SPECS))
def test_every_objective_steps_and_accumulates_exactly(tiny_models, name):
    full, stats = _step(tiny_models, name, micro=64)
    assert stats["update_skipped"] == 0.0 and full.version == 1
    assert stats["learner_sampler_absdiff_max"] < 1e-4
    split, _ = _step(tiny_models, name, micro=2)
    # Compare gradients (kept after the step): Adam's first update is lr*sign(g), which would amplify float noise.
    for (k, a), b in zip(full.model.named_parameters(), split.model.parameters(), strict=True):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-7, rtol=1e-4), f"{name}: micro-batching changed the gradient of {k}"
    assert any(p.grad.abs().sum() > 0 for p in full.model.parameters())


def test_token_selection_trains_fewer_tokens_with_less_activation_memory(tiny_models):
    _, all_tokens = _step(tiny_models, "opd", micro=64)
    _, half = _step(tiny_models, "opd", micro=64, spec=ObjectiveSpec("opd", select_mode="entropy", keep_ratio=0.5))
    assert half["train_tokens"] == pytest.approx(all_tokens["train_tokens"] // 2, abs=1)
    assert half["activation_mib"] < all_tokens["activation_mib"]
    # The same selection twice gives the same update: selection is deterministic for the ranked modes.
    tip_a, _ = _step(tiny_models, "opd", micro=64, spec=ObjectiveSpec("opd", select_mode="overconfident", keep_ratio=0.5))
    tip_b, _ = _step(tiny_models, "opd", micro=64, spec=ObjectiveSpec("opd", select_mode="overconfident", keep_ratio=0.5))
    assert all(torch.equal(a, b) for a, b in zip(tip_a.model.parameters(), tip_b.model.parameters(), strict=True))


def test_exopd_with_lambda_one_is_opd(tiny_models):
    opd, _ = _step(tiny_models, "opd", micro=64)
    ex1, _ = _step(tiny_models, "exopd", micro=64, spec=ObjectiveSpec("exopd", exopd_lam=1.0))
    # OPD's advantages were computed in Python floats, ExOPD's in float32: equal up to rounding.
    for a, b in zip(opd.model.parameters(), ex1.model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_non_finite_loss_skips_the_update(tiny_models):
    learner = Learner(str(tiny_models / "student"), lr=1e-2, objective=SPECS["opd"])
    before = [p.detach().clone() for p in learner.model.parameters()]
    batch = _batch(learner, "opd")
    batch.advantages[0][0] = float("nan")
    stats = learner.train_step(batch)
    assert stats["update_skipped"] == 1.0 and learner.version == 0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True))


def test_sdpo_ema_teacher_moves_toward_student(tiny_models):
    learner, _ = _step(tiny_models, "sdpo", micro=64)
    init = Learner(str(tiny_models / "student"), lr=1e-2).model
    for t, s, i in zip(learner.self_teacher.parameters(), learner.model.parameters(), init.parameters(), strict=True):
        assert torch.allclose(t, 0.95 * i + 0.05 * s, atol=1e-6)
