"""trainer.device: how it resolves, where Ray places a learner rank, the pre-flight refusal of a GPU this
machine lacks, and a learner whose weights, optimizer state and outputs sit where they should (on this CPU
machine)."""

from __future__ import annotations

import random

import pytest
import torch

from opd.config import ConfigError, load_config
from opd.plan import spec_of
from opd.preflight import check_device, check_inputs
from opd.trainer.device import NoCudaError, learner_placement, resolve_device
from opd.trainer.learner import Learner
from opd.trainer.objectives.spec import ObjectiveSpec
from opd.types import TrainBatch

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_auto_is_cuda_exactly_when_the_process_sees_a_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="trainer.device must be one of auto, cpu, cuda, got 'gpu'"):
        resolve_device("gpu")


@no_cuda
def test_cuda_without_a_gpu_names_the_key():
    with pytest.raises(NoCudaError, match="trainer.device=cuda, but this process sees no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    "device,backend,ranks,gpus,expected",
    [
        ("auto", "auto", 1, 0, ("cpu", False)),  # the laptop: unchanged
        ("auto", "auto", 1, 1, ("cuda", True)),  # one rank on a GPU cluster takes a GPU now
        ("auto", "auto", 4, 2, ("cpu", False)),  # fewer GPUs than ranks: all on the CPU, not some
        ("auto", "auto", 2, 8, ("cuda", True)),
        ("cpu", "auto", 2, 8, ("cpu", False)),  # asked for the CPU: no GPU reserved
        ("cpu", "nccl", 2, 8, ("cpu", True)),  # NCCL needs a GPU for its collectives even so
        ("cuda", "gloo", 1, 0, ("cuda", True)),  # asked: Ray refuses to place it, with its message
    ],
)
def test_one_decision_places_single_and_several_ranks(device, backend, ranks, gpus, expected):
    assert learner_placement(device, backend, ranks, gpus) == expected


@no_cuda
def test_preflight_refuses_cuda_on_the_local_ray_only(tmp_path):
    cfg = load_config(None, ["trainer.device=cuda", f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"trainer.device=cuda, but this process sees no CUDA GPU"):
        check_device(cfg)
    # On a cluster the driver may lack the GPU its workers have: the learner rank reports it there.
    check_device(load_config(None, ["trainer.device=cuda", "cluster.address=auto"]))
    check_device(load_config(None, ["trainer.device=auto"]))


@no_cuda
def test_check_inputs_runs_the_device_check(tmp_path, tiny_models):
    cfg = load_config(None, ["trainer.device=cuda", f"run.output_dir={tmp_path / 'run'}",
                             f"models.student={tiny_models / 'student'}",
                             f"models.teacher={tiny_models / 'teacher'}"])
    with pytest.raises(ConfigError, match="trainer.device=cuda"):
        check_inputs(cfg)


def _batch(n: int = 4, seed: int = 0) -> TrainBatch:
    rng = random.Random(seed)
    prompts = [[rng.randrange(6, 90) for _ in range(4)] for _ in range(n)]
    responses = [[rng.randrange(6, 90) for _ in range(3)] for _ in range(n)]
    sampler = [[-rng.uniform(0.5, 3.0) for _ in r] for r in responses]
    return TrainBatch(uids=[f"u{i}" for i in range(n)], prompt_ids=prompts, response_ids=responses,
                      sampler_logprobs=sampler, advantages=[[0.3] * len(r) for r in responses],
                      teacher_logprobs=[[x - 0.2 for x in s] for s in sampler], objective="exopd")


def test_every_model_the_learner_holds_and_its_optimizer_state_live_on_its_device(tiny_models, tmp_path):
    """ExOPD holds a reference model, full-vocabulary OPD an HF teacher: all of them, the student and AdamW's
    state on the learner's device; what leaves the learner (probe, checkpoint) is on the CPU."""
    for spec in (spec_of("algorithm=exopd", "exopd.lam=1.25"), spec_of("opd.divergence=full_vocab")):
        learner = Learner(str(tiny_models / "student"), lr=1e-3, objective=spec,
                          teacher_dir=str(tiny_models / "teacher"), device="auto")
        assert learner.device == resolve_device("auto")
        held = [learner.model, learner.teachers.reference, learner.teachers.hf_teacher]
        assert sum(m is not None for m in held) == 2
        assert all(p.device == learner.device for m in held if m is not None for p in m.parameters())
        stats = learner.train_step(_batch())
        assert stats["update_skipped"] == 0.0
        state = [t for s in learner.opt.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.dim() > 0]
        assert state and all(t.device == learner.device and t.dtype == torch.float32 for t in state)
        assert all(isinstance(x, float) for x in learner.probe_logprobs([7, 8, 9, 10]))
    learner.save(str(tmp_path))
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert all(t.device.type == "cpu" for s in saved["state"].values() for t in s.values()
               if torch.is_tensor(t))
    learner.load(str(tmp_path))
    assert all(t.device == learner.device for s in learner.opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


def test_explicit_cpu_and_auto_give_the_same_update_here(tiny_models):
    """On this CPU machine auto is the CPU: the very same gradients, bit for bit."""
    grads = []
    for device in ("cpu", "auto"):
        torch.manual_seed(0)
        learner = Learner(str(tiny_models / "student"), lr=1e-2, device=device,
                          objective=ObjectiveSpec("opd"))
        learner.train_step(_batch())
        grads.append([p.grad.clone() for p in learner.model.parameters()])
    if torch.cuda.is_available():
        pytest.skip("auto is CUDA here; tests/test_learner.py covers the CPU numbers")
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
