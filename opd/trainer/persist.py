"""A learner's checkpoint directory, one layout whatever the number of ranks and the strategy.

    model/ or adapter/   the student (HF ``save_pretrained``) or its LoRA adapter (PEFT's format), with the
    tokenizer optimizer.pt         AdamW's state keyed by parameter name
    (``torch.distributed.checkpoint.state_dict``) rng.pt               torch / numpy / python generators (and
    CUDA's): LoRA dropout resumes where it was self_teacher.pt      SDPO's EMA teacher, when the objective has
    one learner.json         steps done and weight version

Under FSDP2 every rank calls ``save`` and ``load`` (the gathers are collectives) and rank 0 alone writes; each
rank reads the files (storage every node sees, as the run directory already must be) and keeps its own slice.
Tensors are saved on the CPU, so a checkpoint resumes on any device and any number of ranks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from opd.trainer import fsdp
from opd.trainer.lora import load_adapter_weights


def save(learner, path: str) -> None:
    out = Path(path)
    model, sharded = learner.model, learner.sharded
    # Gathered on rank 0's CPU when sharded (None: the model saves its own tensors, as it always has).
    state = fsdp.model_state(model) if sharded else None
    optim = fsdp.optimizer_state(model, learner.opt)
    teacher = (fsdp.model_state(learner.teachers.self_teacher.model)
               if learner.teachers.self_teacher is not None else None)
    if learner.comm.rank != 0:
        return
    # With LoRA only the adapter is saved (its config names the base model): PeftModel.from_pretrained loads
    # it.
    weights = out / ("adapter" if learner.lora else "model")
    model.save_pretrained(weights, state_dict=state)
    learner.tokenizer.save_pretrained(weights)
    torch.save(optim, out / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if learner.device.type == "cuda":  # LoRA dropout on CUDA draws from the device's generator
        rng["cuda"] = torch.cuda.get_rng_state(learner.device)
    torch.save(rng, out / "rng.pt")
    if teacher is not None:
        torch.save(teacher, out / "self_teacher.pt")
    (out / "learner.json").write_text(json.dumps({"steps_done": learner.steps_done,
                                                  "version": learner.version}))


def load(learner, path: str) -> None:
    src = Path(path)
    model = learner.model
    if learner.lora:
        load_adapter_weights(model, src / "adapter", fsdp.load_model_state)
    else:
        from opd.trainer.teacher_side import load_model

        fsdp.load_model_state(model, load_model(str(src / "model")).state_dict())
    optim = torch.load(src / "optimizer.pt", map_location="cpu", weights_only=False)
    if all(isinstance(k, int) for k in optim["state"]):  # saved before the optimizer was keyed by name
        learner.opt.load_state_dict(optim)
    else:
        fsdp.load_optimizer_state(model, learner.opt, optim)
    rng = torch.load(src / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and learner.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], learner.device)
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if learner.teachers.self_teacher is not None:
        teacher = torch.load(src / "self_teacher.pt", map_location="cpu", weights_only=True)
        fsdp.load_model_state(learner.teachers.self_teacher.model, teacher)
    meta = json.loads((src / "learner.json").read_text())
    learner.steps_done, learner.version = meta["steps_done"], meta["version"]
