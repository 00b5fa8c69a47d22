"""LoRA students: the learner trains only a PEFT adapter, vLLM serves it unmerged, checkpoints hold it in
PEFT's format.

Unit tests drive the learner directly; the slow ones run the real vLLM engine (through Ray) and the real
driver.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import ray
import torch
from conftest import tiny_overrides
from peft import PeftModel
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.config import ConfigError, load_config
from opd.plan import spec_of
from opd.trainer.learner import Learner
from opd.trainer.lora import LoraSpec
from opd.trainer.losses import token_logprobs
from opd.trainer.objectives.spec import ObjectiveSpec
from opd.types import TrainBatch

SPEC = LoraSpec(r=4, alpha=8.0)
PROBE = list(range(5, 25))


def _batch(learner: Learner, n: int = 6, seed: int = 0) -> TrainBatch:
    """An OPD batch whose sampler log-probs are the learner's own and whose teacher disagrees by up to 1
    nat."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(6, 90) for _ in range(rng.randint(3, 6))] for _ in range(n)]
    responses = [[rng.randrange(6, 90) for _ in range(rng.randint(1, 4))] for _ in range(n)]
    sampler = [learner.probe_logprobs(p + r)[len(p) - 1 :] for p, r in zip(prompts, responses, strict=True)]
    teacher = [[x - rng.uniform(-1, 1) for x in s] for s in sampler]
    adv = [[t - s for s, t in zip(srow, trow, strict=True)]
           for srow, trow in zip(sampler, teacher, strict=True)]
    return TrainBatch(
        uids=[f"u{i}" for i in range(n)], prompt_ids=prompts, response_ids=responses,
        sampler_logprobs=sampler, advantages=adv, teacher_logprobs=teacher, objective="opd",
    )


def _adapter(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" in n}


def _peft_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[:, :-1]
    return token_logprobs(logits, torch.tensor([ids[1:]]))[0].tolist()


def test_only_adapter_params_are_trainable_and_optimised(tiny_models):
    learner = Learner(str(tiny_models / "student"), lr=1e-2, lora=SPEC)
    trainable = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # One A and one B per targeted projection per layer.
    layers = learner.model.config.num_hidden_layers
    assert len(trainable) == 2 * len(SPEC.target_modules) * layers
    in_opt = {id(p) for g in learner.opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in learner.model.parameters() if p.requires_grad}
    assert learner.uses_lora() and not Learner(str(tiny_models / "student"), lr=1e-2).uses_lora()
    # A fresh adapter is the identity (B = 0): the student starts exactly where the base model is.
    base = AutoModelForCausalLM.from_pretrained(tiny_models / "student", dtype=torch.float32)
    assert learner.probe_logprobs(PROBE) == pytest.approx(_peft_logprobs(base, PROBE), abs=1e-6)


def test_steps_move_the_adapter_and_leave_the_base(tiny_models):
    learner = Learner(str(tiny_models / "student"), lr=1e-2, lora=SPEC)
    base_before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" not in n}
    adapter_before, probe_before = _adapter(learner), learner.probe_logprobs(PROBE)
    for seed in (0, 1):
        stats = learner.train_step(_batch(learner, seed=seed))
        assert stats["update_skipped"] == 0.0 and stats["grad_norm"] > 0
    after = _adapter(learner)
    # B starts at zero, so A's first gradient is zero; after two steps every adapter matrix has moved.
    assert all(not torch.equal(adapter_before[n], after[n]) for n in after)
    for n, p in learner.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(base_before[n], p), f"base weight {n} changed"
    assert max(abs(a - b) for a, b in zip(learner.probe_logprobs(PROBE), probe_before, strict=True)) > 1e-4


@pytest.mark.parametrize(
    "spec",
    [spec_of("opd.divergence=full_vocab"), ObjectiveSpec("exopd"), spec_of("algorithm=sdpo", "sdpo.top_k=8")],
    ids=["opd-full-vocab", "exopd", "sdpo"],
)
def test_objectives_with_extra_models_train_the_adapter(tiny_models, spec):
    """The HF teacher (full_vocab), the reference (ExOPD) and the SDPO self-teacher run beside a LoRA student;
    the self-teacher's EMA follows the adapter only (its base is the student's, frozen)."""
    learner = Learner(str(tiny_models / "student"), lr=1e-2, lora=SPEC, objective=spec,
                      teacher_dir=str(tiny_models / "teacher"))
    batch = _batch(learner)
    if spec.name == "sdpo":
        batch.teacher_prompt_ids = [p + [30, 31, 32] for p in batch.prompt_ids]
        batch.routes = ["sdpo"] * len(batch.uids)
        batch.objective = "sdpo"
    before = _adapter(learner)
    for _ in range(2):
        stats = learner.train_step(batch)
        assert stats["update_skipped"] == 0.0 and stats["grad_norm"] > 0
    assert any(not torch.equal(before[n], p) for n, p in _adapter(learner).items())
    if spec.name == "sdpo":
        teacher = {n: p for n, p in learner.teachers.self_teacher.named_parameters() if "lora_B" in n}
        assert any(p.abs().max() > 0 for p in teacher.values()), (
            "the self-teacher's adapter did not follow the student")


def test_checkpoint_is_a_peft_adapter_and_load_resumes(tiny_models, tmp_path):
    student = str(tiny_models / "student")
    learner = Learner(student, lr=1e-2, lora=SPEC)
    for seed in (0, 1):
        learner.train_step(_batch(learner, seed=seed))
    learner.save(str(tmp_path))
    assert not (tmp_path / "model").exists()  # the base is not copied: the adapter's config names it
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == SPEC.r and config["base_model_name_or_path"] == student
    # What the engines receive at each sync is byte for byte what PEFT saves.
    for name, data in learner.export_adapter().items():
        assert (tmp_path / "adapter" / name).read_bytes() == data, name
    # What a user does with the checkpoint: the base model plus the adapter gives the learner's log-probs.
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    user = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert _peft_logprobs(user, PROBE) == pytest.approx(learner.probe_logprobs(PROBE), abs=1e-5)
    # A fresh learner restored from it continues exactly as the original does (weights and optimizer state).
    # another seed: a different fresh adapter, overwritten
    resumed = Learner(student, lr=1e-2, lora=SPEC, seed=7)
    resumed.load(str(tmp_path))
    assert resumed.steps_done == learner.steps_done == 2
    batch = _batch(learner, seed=2)
    learner.train_step(batch)
    resumed.train_step(batch)
    ours, theirs = _adapter(learner), _adapter(resumed)
    for n in ours:
        assert torch.equal(ours[n], theirs[n]), f"resumed adapter differs at {n}"


def test_load_refuses_an_adapter_built_otherwise(tiny_models, tmp_path):
    Learner(str(tiny_models / "student"), lr=1e-2,
            lora=LoraSpec(r=4, target_modules=("q_proj",))).save(str(tmp_path))
    with pytest.raises(ValueError, match="lora.target_modules: the adapter"):
        Learner(str(tiny_models / "student"), lr=1e-2, lora=LoraSpec(r=4)).load(str(tmp_path))
    with pytest.raises(ValueError, match="lora.alpha: the adapter"):
        Learner(str(tiny_models / "student"), lr=1e-2,
                lora=LoraSpec(r=4, alpha=2.0, target_modules=("q_proj",))).load(str(tmp_path))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [(["lora.r=4", "rollout.engine=hf"], "lora.r=4"), (["lora.r=600"], "lora.r=600"),
     (["lora.r=4", "lora.target_modules=[]"], "lora.target_modules")],
)
def test_config_refuses_unsupported_lora_settings(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


@pytest.mark.slow
def test_engine_serves_each_adapter_version_and_drops_the_old(tiny_models, local_ray):
    from opd.rollout.engine import VLLMEngine

    learner = Learner(str(tiny_models / "student"), lr=1e-2, lora=SPEC)
    engine = ray.remote(VLLMEngine).options(num_cpus=1).remote(str(tiny_models / "student"), max_model_len=32,
                                                               lora_rank=SPEC.r)
    try:
        for version in range(3):
            ray.get(engine.load_adapter.remote(learner.export_adapter(), version))
            got = ray.get(engine.score.remote([PROBE]))[0].token_logprobs
            assert got == pytest.approx(learner.probe_logprobs(PROBE), abs=1e-4), (
                f"version {version} not served")
            # only the current version stays loaded
            assert ray.get(engine.loaded_adapters.remote()) == {version + 1}
            learner.train_step(_batch(learner, seed=version))
        # The learner moved on; the engine still serves version 2, and the probe tells them apart.
        stale = ray.get(engine.score.remote([PROBE]))[0].token_logprobs
        assert max(abs(a - b) for a, b in zip(stale, learner.probe_logprobs(PROBE), strict=True)) > 1e-3
    finally:
        ray.kill(engine)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _ckpt_adapter(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "adapter"
                         / "adapter_model.safetensors"))


@pytest.mark.slow
def test_lora_job_syncs_the_adapter_and_resumes(tiny_models, local_ray, tmp_path):
    from opd.driver import run

    out = tmp_path / "lora"
    extra = {"lora.r": 4, "checkpoint.keep": 2, "trainer.lr": 1e-2}
    summary = run(load_config(None, tiny_overrides(tiny_models, out, **extra)), progress=False)
    assert summary["steps"] == 2 and summary["weight_version"] == 2
    rows = _metrics(out)
    assert [r["weight_version"] for r in rows] == [1, 2]
    for r in rows:
        assert r["update_skipped"] == 0.0
        # the engines serve the learner's adapter (a stale one fails, see above)
        assert r["probe_max_diff"] < 1e-3
        assert r["learner_sampler_absdiff_max"] < 1e-3  # and sample with it
    final = out / "checkpoints" / "step_000002"
    assert (final / "optimizer.pt").is_file() and not (final / "model").exists()
    trained = _ckpt_adapter(out, 2)
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in trained.items()), "the adapter never trained"
    # A user's PeftModel on the checkpoint matches the learner restored from it.
    student = str(tiny_models / "student")
    learner = Learner(student, lr=1e-2, lora=LoraSpec(r=4))  # the config's defaults: alpha 16, q/k/v/o
    learner.load(str(final))
    user = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
                                     final / "adapter")
    assert _peft_logprobs(user.eval(), PROBE) == pytest.approx(learner.probe_logprobs(PROBE), abs=1e-5)

    # The run as it stood at its step-1 checkpoint, resumed: it ends on the uninterrupted run's adapter.
    cut = tmp_path / "cut"
    shutil.copytree(out, cut, ignore=shutil.ignore_patterns("step_000002", "summary.json"))
    (cut / "checkpoints" / "latest").write_text("step_000001")
    resumed = run(load_config(None, tiny_overrides(tiny_models, cut, **extra)), resume=True, progress=False)
    assert resumed["steps"] == 2 and [r["step"] for r in _metrics(cut)] == [0, 1]
    assert all(r["probe_max_diff"] < 1e-3 for r in _metrics(cut))
    got = _ckpt_adapter(cut, 2)
    for k in trained:
        assert torch.equal(trained[k], got[k]), f"resumed adapter differs from the uninterrupted run at {k}"


@pytest.mark.slow
def test_two_learner_ranks_train_the_same_adapter_as_one(tiny_models, local_ray):
    """DDP over the adapter: the ranks build the same fresh adapter, all-reduce its gradients and stay
    identical, and two ranks end where one rank ends."""
    from ray.util.placement_group import remove_placement_group

    from opd.cluster import connect_learners, start_learners

    def adapters(ranks: int) -> list[dict[str, torch.Tensor]]:
        cfg = load_config(None, [f"models.student={tiny_models / 'student'}", f"run.name=lora-ranks{ranks}",
                                 f"trainer.num_ranks={ranks}", "lora.r=4", "trainer.lr=1e-2"])
        group = start_learners(cfg)
        try:
            connect_learners(group, "gloo", "ddp")  # replicas: each rank exports its own adapter below
            local = Learner(str(tiny_models / "student"), lr=1e-2, lora=SPEC)  # only to make the batches
            for seed in (0, 1):
                ray.get(group.ranks[0].train_step.remote(_batch(local, n=8, seed=seed)))
            files = ray.get([r.export_adapter.remote() for r in group.ranks])
            return [safetensors_load(f["adapter_model.safetensors"]) for f in files]
        finally:
            for actor in group.ranks:
                ray.kill(actor)
            if group.placement_group is not None:
                remove_placement_group(group.placement_group)

    one, (rank0, rank1) = adapters(1)[0], adapters(2)
    for k in one:
        assert torch.equal(rank0[k], rank1[k]), f"the ranks' adapters drifted apart at {k}"
        assert torch.allclose(one[k], rank0[k], atol=1e-5), f"2 ranks differ from 1 rank at {k}"
