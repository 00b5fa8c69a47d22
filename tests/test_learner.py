"""The learner on every objective, driven directly (no Ray, no vLLM) on the tiny checkpoint.

The key property: gradient accumulation over micro-batches gives the same update as one full batch, for every
objective and its denominator (token-mean, SDPO-routed tokens only, SRPO's shared denominator, TIP kept
tokens).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random

import pytest
import torch

from opd.plan import spec_of
from opd.trainer.learner import Learner
from opd.trainer.lora import LoraSpec
from opd.trainer.microbatch import by_token_budget, padded_tokens, plan
from opd.trainer.objectives.spec import ObjectiveSpec
from opd.trainer.shards import take
from opd.types import TrainBatch

SPECS = {
    "opd": ObjectiveSpec("opd"),
    "grpo": ObjectiveSpec("grpo"),
    "grpo-seq-mean": spec_of("algorithm=grpo", "grpo.loss_agg=seq-mean-token-mean"),
    "exopd": spec_of("algorithm=exopd", "exopd.lam=1.25"),
    "opd-topk": spec_of("opd.divergence=teacher_topk", "teacher.top_k=5"),
    "opd-full-vocab-jsd": spec_of("opd.divergence=full_vocab", "opd.full_vocab_kind=jsd"),
    "sdpo": spec_of("algorithm=sdpo", "sdpo.top_k=8"),
    "srpo": spec_of("algorithm=srpo", "sdpo.top_k=8"),
    "opd-tip": spec_of("selection.mode=entropy", "selection.keep_ratio=0.5"),
    "opd-tip-soft-or": spec_of("selection.mode=soft_or", "selection.keep_ratio=0.4"),
}


def _batch(learner: Learner, name: str, n: int = 6, seed: int = 0, group: int = 1) -> TrainBatch:
    rng = random.Random(seed)
    prompts = [[rng.randrange(6, 90) for _ in range(rng.randint(3, 6))] for _ in range(n // group)]
    prompts = [p for p in prompts for _ in range(group)]  # a group's samples share their prompt
    responses = [[rng.randrange(6, 90) for _ in range(rng.randint(1, 4))] for _ in range(n)]
    sampler = [learner.probe_logprobs(p + r)[len(p) - 1 :] for p, r in zip(prompts, responses, strict=True)]
    teacher = [[x - rng.uniform(-1, 1) for x in s] for s in sampler]
    adv = [[-(s - t) for s, t in zip(srow, trow, strict=True)]
           for srow, trow in zip(sampler, teacher, strict=True)]
    k = 4
    topk_ids = [[[rng.randrange(6, 90) for _ in range(k)] for _ in r] for r in responses]
    topk_lp = [[sorted((rng.uniform(-6, -1) for _ in range(k)), reverse=True) for _ in r] for r in responses]
    spec = SPECS[name]
    sd = spec.name in ("sdpo", "srpo")
    return TrainBatch(
        uids=[f"u{i}" for i in range(n)], prompt_ids=prompts, response_ids=responses,
        sampler_logprobs=sampler,
        advantages=(adv if spec.name != "grpo"
                    else [[(-1) ** i * 0.7] * len(r) for i, r in enumerate(responses)]),
        teacher_logprobs=teacher, objective=spec.name,
        loss_weights=([1.0, 0.5, 2.0, 1.0, 0.0, 1.0] * 2)[:n],
        teacher_topk_ids=topk_ids if spec["opd"].divergence == "teacher_topk" else None,
        teacher_topk_logprobs=topk_lp if spec["opd"].divergence == "teacher_topk" else None,
        teacher_prompt_ids=([(p + [30, 31, 32] if i % 3 else None) for i, p in enumerate(prompts)]
                            if sd else None),
        routes=([("sdpo" if i % 3 else ("none" if spec.name == "sdpo" else "grpo")) for i in range(n)]
                if sd else None),
    )


def _step(models, name, micro, spec=None, n=6, group=1, **kw):
    torch.manual_seed(0)
    student = str(models / "student")
    learner = Learner(student, lr=1e-2, micro_batch_size=micro, objective=spec or SPECS[name],
                      teacher_dir=str(models / "teacher"), **kw)
    stats = learner.train_step(_batch(learner, name, n=n, group=group))
    return learner, stats


def _same_grads(a: Learner, b: Learner, what: str, rtol: float = 1e-4) -> None:
    for (k, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        if not pa.requires_grad:  # LoRA's frozen base
            continue
        assert pa.grad is not None and torch.allclose(pa.grad, pb.grad, atol=1e-7, rtol=rtol), (
            f"{what} changed the gradient of {k}")


@pytest.mark.parametrize("name", list(SPECS))
def test_every_objective_steps_and_accumulates_exactly(tiny_models, name):
    full, stats = _step(tiny_models, name, micro=64)
    assert stats["update_skipped"] == 0.0 and full.version == 1
    assert stats["learner_sampler_absdiff_max"] < 1e-4
    split, _ = _step(tiny_models, name, micro=2)
    # Compare gradients (kept after the step): Adam's first update is lr*sign(g), which would amplify float
    # noise.
    for (k, a), b in zip(full.model.named_parameters(), split.model.parameters(), strict=True):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-7, rtol=1e-4), (
            f"{name}: micro-batching changed the gradient of {k}")
    assert any(p.grad.abs().sum() > 0 for p in full.model.parameters())


PIECE_SPECS = {**SPECS, "opd-full-vocab-reverse": spec_of("opd.divergence=full_vocab")}


@pytest.mark.parametrize("name", list(PIECE_SPECS))
def test_lm_head_and_loss_in_pieces_give_the_same_update(tiny_models, name):
    """The LM head and the loss run piece by piece (one sequence, or one kept token with TIP, per piece) and
    their gradients flow into the trunk in one backward: the same loss and gradients as computing them all at
    once."""
    spec = PIECE_SPECS[name]
    batch_name = {"opd-full-vocab-reverse": "opd-full-vocab-jsd"}.get(name, name)
    whole, a = _step(tiny_models, batch_name, micro=64, spec=spec, logits_chunk_tokens=0)
    piecewise, b = _step(tiny_models, batch_name, micro=64, spec=spec, logits_chunk_tokens=1)
    # 1e-5: the LM head on one token and on many rounds differently (~1e-7 in a log-prob), and OPD's advantage
    # reads the log-prob itself.
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    assert b["train_tokens"] == a["train_tokens"] and b["update_skipped"] == 0.0
    assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-6)
    _same_grads(whole, piecewise, "the LM head in pieces", rtol=1e-5)
    assert b["activation_mib"] < a["activation_mib"]  # one piece's logits live at a time, not the batch's


@pytest.mark.parametrize("name", ["opd-topk", "opd-full-vocab-jsd"])
def test_steps_leave_no_tensor_behind(tiny_models, name):
    """Each step frees what it made. A graph branch never backpropagated (top-k and full-vocab OPD read the
    sampled token's log-prob only detached) once stayed alive through the activation meter's saved-tensor
    hook, one [tokens, vocab] log-softmax per piece per step: gigabytes a step at a real vocabulary."""
    learner, _ = _step(tiny_models, name, micro=2, logits_chunk_tokens=1)
    batch = _batch(learner, name)

    def tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    learner.train_step(batch)
    before = tensors()
    for _ in range(3):
        learner.train_step(batch)
    assert tensors() == before


@pytest.mark.parametrize("name", list(PIECE_SPECS))
def test_shared_prompts_give_the_same_update_with_less_activation_memory(tiny_models, name):
    """Each distinct prompt run once with its group's responses reading its cache: the loss and gradients of
    one forward per sequence, on fewer positions (the reference, HF teacher and self-teacher share prompts
    too)."""
    spec = PIECE_SPECS[name]
    batch_name = {"opd-full-vocab-reverse": "opd-full-vocab-jsd"}.get(name, name)
    plain, a = _step(tiny_models, batch_name, micro=64, spec=spec, group=2, share_prompts=False)
    shared, b = _step(tiny_models, batch_name, micro=64, spec=spec, group=2, share_prompts=True)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    assert b["train_tokens"] == a["train_tokens"] and b["update_skipped"] == 0.0
    _same_grads(plain, shared, "sharing prompts", rtol=1e-4)
    assert b["activation_mib"] < a["activation_mib"]


@pytest.mark.parametrize("name", ["opd", "sdpo", "srpo", "grpo-seq-mean", "opd-tip"])
def test_zero_weight_samples_count_as_filtered_out(tiny_models, name):
    """A sample of weight 0 (PACED's all-right or all-wrong problems, the quality gate) is as if filtered out:
    the step equals the step on the batch without it, loss and gradient. Its tokens stay out of the
    token-mean's denominator (and of TIP's selection), its sequence out of a sequence-mean's count."""
    torch.manual_seed(0)
    full = Learner(str(tiny_models / "student"), lr=1e-2, micro_batch_size=64, objective=SPECS[name])
    batch = _batch(full, name)
    assert 0.0 in batch.loss_weights
    a = full.train_step(batch)
    torch.manual_seed(0)
    kept = Learner(str(tiny_models / "student"), lr=1e-2, micro_batch_size=64, objective=SPECS[name])
    b = kept.train_step(take(batch, [i for i, w in enumerate(batch.loss_weights) if w > 0]))
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    _same_grads(full, kept, "dropping the zero-weight sample")


def test_token_selection_trains_fewer_tokens_with_less_activation_memory(tiny_models):
    _, all_tokens = _step(tiny_models, "opd", micro=64)
    tip, half = _step(tiny_models, "opd", micro=64,
                      spec=spec_of("selection.mode=entropy", "selection.keep_ratio=0.5"))
    batch = _batch(tip, "opd")  # the same lengths and weights; a weight-0 sample's tokens are never selected
    live_tokens = sum(len(r) for r, w in zip(batch.response_ids, batch.loss_weights, strict=True) if w)
    assert half["train_tokens"] == live_tokens // 2 < all_tokens["train_tokens"] // 2
    assert half["activation_mib"] < all_tokens["activation_mib"]
    # The same selection twice gives the same update: selection is deterministic for the ranked modes.
    tip_a, _ = _step(tiny_models, "opd", micro=64,
                     spec=spec_of("selection.mode=overconfident", "selection.keep_ratio=0.5"))
    tip_b, _ = _step(tiny_models, "opd", micro=64,
                     spec=spec_of("selection.mode=overconfident", "selection.keep_ratio=0.5"))
    assert all(torch.equal(a, b)
               for a, b in zip(tip_a.model.parameters(), tip_b.model.parameters(), strict=True))


def test_exopd_with_lambda_one_is_opd(tiny_models):
    opd, _ = _step(tiny_models, "opd", micro=64)
    ex1, _ = _step(tiny_models, "exopd", micro=64, spec=spec_of("algorithm=exopd", "exopd.lam=1.0"))
    # OPD's advantages were computed in Python floats, ExOPD's in float32: equal up to rounding.
    for a, b in zip(opd.model.parameters(), ex1.model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_non_finite_loss_skips_the_update(tiny_models):
    learner = Learner(str(tiny_models / "student"), lr=1e-2, objective=SPECS["opd"])
    before = [p.detach().clone() for p in learner.model.parameters()]
    batch = _batch(learner, "opd")
    # OPD's advantage comes from the teacher's and the learner's log-probs
    batch.teacher_logprobs[0][0] = float("nan")
    stats = learner.train_step(batch)
    assert stats["update_skipped"] == 1.0 and learner.version == 0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True))


@pytest.mark.parametrize("name", ["grpo", "opd"])
def test_a_step_without_signal_moves_nothing(tiny_models, name):
    """Every advantage 0 (a GRPO batch without a reward) or every weight 0 (PACED's agreeing groups): no
    gradient, so no update. AdamW stepped on a zero gradient still moves every weight on its momentum."""
    learner, first = _step(tiny_models, name, micro=64)
    assert first["update_skipped"] == 0.0 and first["no_signal"] == 0.0 and learner.version == 1
    weights = [p.detach().clone() for p in learner.model.parameters()]
    moments = [v.clone() for st in learner.opt.state.values() for v in st.values() if torch.is_tensor(v)]
    batch = _batch(learner, name, seed=1)
    if name == "grpo":
        batch = dataclasses.replace(batch, advantages=[[0.0] * len(a) for a in batch.advantages])
    else:
        batch = dataclasses.replace(batch, loss_weights=[0.0] * len(batch.loss_weights))
    stats = learner.train_step(batch)
    assert stats["update_skipped"] == 1.0 and stats["no_signal"] == 1.0 and stats["grad_norm"] == 0.0
    assert learner.version == 1 and learner.steps_done == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, learner.model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(
        moments, [v for st in learner.opt.state.values() for v in st.values() if torch.is_tensor(v)],
        strict=True))


def test_sdpo_ema_teacher_moves_toward_student(tiny_models):
    learner, _ = _step(tiny_models, "sdpo", micro=64)
    init = Learner(str(tiny_models / "student"), lr=1e-2).model
    for t, s, i in zip(learner.teachers.self_teacher.parameters(), learner.model.parameters(),
                       init.parameters(), strict=True):
        assert torch.allclose(t, 0.95 * i + 0.05 * s, atol=1e-6)


def test_token_budget_groups_similar_lengths_within_the_budget():
    lengths = [40, 3, 38, 5, 4, 39, 41, 6, 2, 120]
    groups = plan(lengths, micro_batch_size=4, micro_batch_tokens=80)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    # Every group fits, except a row that alone exceeds the budget: a row is never split.
    assert all(len(g) * max(lengths[i] for i in g) <= 80 or len(g) == 1 for g in groups)
    assert [9] in groups
    assert padded_tokens(lengths, groups) < padded_tokens(lengths, plan(lengths, micro_batch_size=4))
    with pytest.raises(ValueError, match="trainer.micro_batch_tokens"):
        by_token_budget(lengths, 0)


@pytest.mark.parametrize("name", ["opd", "grpo-seq-mean", "opd-topk", "srpo"])
def test_token_budget_split_gives_the_same_update(tiny_models, name):
    """Length-sorted token-budget micro-batches: same loss and gradient as fixed-count ones, with less
    padding."""
    by_count_, a = _step(tiny_models, name, micro=3, n=12)
    by_tokens, b = _step(tiny_models, name, micro=3, n=12, micro_batch_tokens=24)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
    assert b["train_tokens"] == a["train_tokens"] and b["update_skipped"] == 0.0
    assert b["pad_fraction"] < a["pad_fraction"]
    _same_grads(by_count_, by_tokens, "the token-budget split")


def test_bf16_autocast_trains_float32_weights_close_to_float32(tiny_models):
    f32, a = _step(tiny_models, "opd-full-vocab-jsd", micro=64)
    bf16, b = _step(tiny_models, "opd-full-vocab-jsd", micro=64, autocast="bf16")
    assert b["update_skipped"] == 0.0 and math.isfinite(b["grad_norm"])
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights
    assert b["loss"] != a["loss"]  # autocast really ran: bf16 rounding moves the loss a little
    assert b["loss"] == pytest.approx(a["loss"], rel=5e-2)
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([p.grad.flatten() for p in f32.model.parameters()]),
        torch.cat([p.grad.flatten() for p in bf16.model.parameters()]), dim=0)
    assert cos > 0.99


@pytest.mark.parametrize("lora", [None, LoraSpec(4)], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_update_with_less_activation_memory(tiny_models, lora):
    plain, a = _step(tiny_models, "opd", micro=64, lora=lora)
    ckpt, b = _step(tiny_models, "opd", micro=64, lora=lora, gradient_checkpointing=True)
    assert ckpt.model.is_gradient_checkpointing
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    _same_grads(plain, ckpt, "gradient checkpointing", rtol=1e-5)
    assert any(p.grad.abs().sum() > 0 for p in ckpt.model.parameters() if p.grad is not None)
    for p, q in zip(plain.model.parameters(), ckpt.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    assert b["activation_mib"] < a["activation_mib"]


def test_full_vocab_learner_reports_the_teacher_kl_it_computed(tiny_models):
    """No teacher actor scores a full-vocabulary OPD batch: the learner's own teacher forward gives
    ``teacher_kl``, the sampled-token log q - log pi_T averaged over response tokens, checked against an
    independent HF forward."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    learner = Learner(str(tiny_models / "student"), lr=1e-2, micro_batch_size=4,
                      objective=SPECS["opd-full-vocab-jsd"],
                      teacher_dir=str(tiny_models / "teacher"))
    batch = _batch(learner, "opd-full-vocab-jsd")
    batch.teacher_logprobs = None
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models / "teacher", dtype=torch.float32).eval()
    diffs = []
    with torch.no_grad():
        for p, r, q in zip(batch.prompt_ids, batch.response_ids, batch.sampler_logprobs, strict=True):
            logp = torch.log_softmax(teacher(torch.tensor([p + r])).logits[0, len(p) - 1 : -1], -1)
            diffs += [qt - float(logp[t, tok]) for t, (tok, qt) in enumerate(zip(r, q, strict=True))]
    stats = learner.train_step(batch)
    assert stats["teacher_kl"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-5)
    assert math.isfinite(stats["loss"]) and stats["update_skipped"] == 0.0


def test_full_vocab_from_the_teachers_hidden_states_equals_the_learners_teacher_forward(tiny_models):
    """opd.full_vocab_source=teacher: the teacher's final hidden states at the response positions (what its
    actor sends), with the teacher's LM head applied here, give the same loss and gradients as the learner's
    own forward of the whole teacher (Adam's first step would magnify float noise on tiny gradients, so
    gradients are compared)."""
    from transformers import AutoModelForCausalLM

    spec = SPECS["opd-full-vocab-jsd"]
    by_learner, stats = _step(tiny_models, "opd-full-vocab-jsd", micro=4)
    torch.manual_seed(0)
    by_hidden = Learner(str(tiny_models / "student"), lr=1e-2, micro_batch_size=4,
                        teacher_dir=str(tiny_models / "teacher"),
                        objective=spec_of("opd.divergence=full_vocab",
                                                f"opd.full_vocab_kind={spec['opd'].full_vocab_kind}",
                                                "opd.full_vocab_source=teacher"))
    assert by_hidden.teachers.hf_teacher is None and by_hidden.teachers.teacher_head is not None
    batch = _batch(by_hidden, "opd-full-vocab-jsd")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models / "teacher", dtype=torch.float32).eval()
    with torch.no_grad():
        batch.teacher_hidden = [
            teacher.get_decoder()(torch.tensor([p + r])).last_hidden_state[0, len(p) - 1 : -1].numpy()
            for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)]
    got = by_hidden.train_step(batch)
    assert got["loss"] == pytest.approx(stats["loss"], rel=1e-5)
    _same_grads(by_learner, by_hidden, "the teacher's hidden states instead of its forward")


def test_full_vocab_from_the_teacher_without_hidden_states_is_refused(tiny_models):
    """A batch whose scores came without the teacher's hidden states cannot give the full-vocabulary loss."""
    learner = Learner(str(tiny_models / "student"), lr=1e-2, micro_batch_size=4,
                      teacher_dir=str(tiny_models / "teacher"),
                      objective=spec_of("opd.divergence=full_vocab", "opd.full_vocab_source=teacher"))
    with pytest.raises(ValueError, match="carries no teacher hidden states"):
        learner.train_step(_batch(learner, "opd-full-vocab-jsd"))


def test_a_row_without_tokens_counts_the_same_however_the_batch_is_split(tiny_models):
    """grpo.loss_agg=seq-mean-token-mean with an empty response: the per-sequence mean of each piece leaves
    the row out, and so does the batch's sequence count, so micro-batches of 6, 2 and 1 give one loss and one
    gradient (before: -0.168 at 6 and -0.280 at 2, as the rescaling by rows kept the row the mean had left
    out)."""
    spec = spec_of("algorithm=grpo", "grpo.loss_agg=seq-mean-token-mean")
    runs = []
    for micro in (6, 2, 1):
        torch.manual_seed(0)
        learner = Learner(str(tiny_models / "student"), lr=1e-2, micro_batch_size=micro, objective=spec)
        batch = _batch(learner, "grpo-seq-mean")
        batch.response_ids[1], batch.sampler_logprobs[1], batch.advantages[1] = [], [], []
        batch.teacher_logprobs[1] = []
        runs.append((learner, learner.train_step(batch)))
    (whole, a), *rest = runs
    for split, b in rest:
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["update_skipped"] == 0.0
        _same_grads(whole, split, "splitting the batch around an empty row")


def _at_masked(rows, mask, f):
    return [[f(x) if not m else x for x, m in zip(row, mrow, strict=True)] for row, mrow in zip(rows, mask,
                                                                                                  strict=True)]


@pytest.mark.parametrize("name", ["opd", "grpo-seq-mean", "opd-topk", "opd-full-vocab-jsd", "opd-tip"])
def test_masked_tokens_are_context_only(tiny_models, name):
    """An episode's tool output and template tokens (loss_mask 0) are read, never trained: whatever the batch
    holds at those positions (sampler and teacher log-probs, advantages, the teacher's top-k) the loss, the
    token count and the gradient are the same; and the mask does take them out (training on every token
    differs)."""
    def step(batch):
        torch.manual_seed(0)
        learner = Learner(str(tiny_models / "student"), lr=1e-2, micro_batch_size=2, objective=SPECS[name],
                          teacher_dir=str(tiny_models / "teacher"))
        return learner, learner.train_step(batch)

    torch.manual_seed(0)
    batch = _batch(Learner(str(tiny_models / "student"), lr=1e-2, objective=SPECS[name],
                           teacher_dir=str(tiny_models / "teacher")), name)
    mask = [[int(j % 2 == 0) for j in range(len(r))] for r in batch.response_ids]
    assert any(0 in m for m in mask)
    masked = dataclasses.replace(batch, loss_mask=mask)
    noisy = dataclasses.replace(
        masked, sampler_logprobs=_at_masked(batch.sampler_logprobs, mask, lambda x: x - 3.0),
        teacher_logprobs=_at_masked(batch.teacher_logprobs, mask, lambda x: x + 2.5),
        advantages=_at_masked(batch.advantages, mask, lambda x: -5.0 * x - 1.0),
        teacher_topk_logprobs=(None if batch.teacher_topk_logprobs is None else
                               _at_masked(batch.teacher_topk_logprobs, mask, lambda k: [v - 2.0 for v in k])))
    (a_learner, a), (b_learner, b) = step(masked), step(noisy)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
    assert b["train_tokens"] == a["train_tokens"] and b["update_skipped"] == 0.0
    _same_grads(a_learner, b_learner, "changing masked tokens' numbers", rtol=1e-6)
    full_learner, full = step(batch)
    assert full["train_tokens"] > a["train_tokens"]
    assert any(not torch.allclose(p.grad, q.grad) for p, q in zip(full_learner.model.parameters(),
                                                                   a_learner.model.parameters(), strict=True))
