"""LoRA students: the learner trains a PEFT adapter on a frozen base, and the engines serve it as an adapter.

Torch and peft only. The adapter travels as the files of PEFT's ``save_pretrained`` format
(``adapter_config.json`` and ``adapter_model.safetensors``), as bytes: the learner serialises them here, Ray
carries them to every rollout worker (on any node), and the worker writes them to a directory of its own that
vLLM loads with a ``LoRARequest``. The same format is what a checkpoint holds, so a user loads it with
``PeftModel.from_pretrained(base, dir)``.

    learner = Learner("models/demo/student", lr=1e-3, lora=LoraSpec(r=8))
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save

from opd.rollout.weight_sync import whole


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))


def wrap(model: torch.nn.Module, spec: LoraSpec, seed: int) -> PeftModel:
    """The model with a fresh adapter; only the adapter's weights require gradients.

    The adapter's random A matrices are drawn from a generator seeded by ``seed`` alone, so every learner rank
    builds the identical adapter whatever its RNG did before (ranks must hold identical copies).
    """
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    return peft_model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_files(model: PeftModel) -> dict[str, bytes]:
    """The adapter's two files as ``model.save_pretrained`` writes them, file name -> bytes.

    Built in memory rather than through ``save_pretrained``, which also renders a model card: that took 5-10x
    longer than the rest of the export on the demo student, at every step's sync.
    """
    # Whole tensors: under FSDP2 each is gathered from every rank (so every rank calls this, rank 0 keeps it).
    state = {k: whole(v).detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    config = copy.copy(model.peft_config["default"])
    config.inference_mode = True  # as save_pretrained marks a saved adapter
    with tempfile.TemporaryDirectory(prefix="opd-lora-config-") as tmp:
        config.save_pretrained(tmp)
        config_bytes = (Path(tmp) / "adapter_config.json").read_bytes()
    return {"adapter_config.json": config_bytes,
            "adapter_model.safetensors": save(state, metadata={"format": "pt"})}


def load_adapter_weights(model: PeftModel, directory: Path, load=None) -> None:
    """Restore the adapter's weights from a ``save_pretrained`` directory into ``model`` in place.

    The saved adapter must have been built as this one (``lora.*`` unchanged since it was saved): the same
    weights under another alpha would be another model. ``load(model, state, strict)``, when given, takes the
    state dict in the model's own names instead of ``model.load_state_dict`` (FSDP2's shards:
    ``opd.trainer.fsdp``)."""
    saved = json.loads((directory / "adapter_config.json").read_text())
    ours = model.peft_config["default"]
    for key, mine, theirs in [("r", ours.r, saved.get("r")),
                              ("alpha", ours.lora_alpha, saved.get("lora_alpha")),
                              ("target_modules", sorted(ours.target_modules),
                               sorted(saved.get("target_modules") or []))]:
        if mine != theirs:
            raise ValueError(f"lora.{key}: the adapter in {directory} was saved with {theirs!r}, "
                             f"this run has {mine!r}")
    state = load_file(str(directory / "adapter_model.safetensors"))
    if load is not None:
        # PEFT names the keys as the model does, then calls the model's load_state_dict once: that call goes
        # to
        # ``load`` (which may call the model's own load_state_dict, so the detour is removed first).
        def routed(sd, strict=False, assign=False):
            del model.load_state_dict
            return load(model, sd, strict=False)

        model.load_state_dict = routed
    try:
        result = set_peft_model_state_dict(model, state)
    finally:
        model.__dict__.pop("load_state_dict", None)
    # Loading is non-strict (the base weights are not in the file): an adapter key left unset is the mismatch.
    wrong = list(result.unexpected_keys) + [k for k in result.missing_keys if "lora_" in k]
    if wrong or not state:
        raise ValueError(f"adapter in {directory} does not fit this model "
                         f"(first mismatched key: {(wrong or ['none'])[0]})")
