"""Depth-pruned students: a checkpoint with a subset of its teacher's decoder layers (Minitron-style layer
dropping).

    opd prune models/smollm2 --keep-layers every:3 --out models/smollm2-L10      # 10 of 30 layers
    opd prune models/smollm2 --keep-layers 0-9,20-29 --out models/smollm2-L20

The kept layers keep their weights, in order; embeddings, final norm and LM head are copied whole. The result
is a
``save_pretrained`` directory (config, weights, tokenizer, chat template, generation config) built from the
source's own config class with fewer layers, so every per-layer index (KV cache slots, ``layer_types``) is
right by construction and vLLM, transformers and opd load it like any checkpoint.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from opd.errors import ConfigError
from opd.models.store import building, read_stamp, write_stamp

log = logging.getLogger("opd.models")

STAMP = "opd_prune.json"


def parse_keep_layers(spec: str, num_layers: int) -> list[int]:
    """``every:K``: ceil(L/K) layers evenly spaced from the first to the last (both kept: the input and output
    ends matter most); otherwise a comma list of indices and ``a-b`` ranges (inclusive)."""
    where = f"--keep-layers {spec!r}"
    spec = spec.strip()
    if spec.startswith("every:"):
        try:
            k = int(spec.removeprefix("every:"))
        except ValueError:
            raise ConfigError(f"{where}: every:K needs an integer K") from None
        if not 1 <= k <= num_layers:
            raise ConfigError(f"{where}: K must be between 1 and the model's {num_layers} layers")
        n = math.ceil(num_layers / k)
        return [0] if n == 1 else sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})
    keep: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"{where}: {part!r} is not an index or an a-b range (or use every:K)")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if lo > hi or hi >= num_layers:
            raise ConfigError(f"{where}: {part!r} is outside layers 0..{num_layers - 1}")
        keep.update(range(lo, hi + 1))
    if not keep:
        raise ConfigError(f"{where}: keeps no layer")
    return sorted(keep)


def prune(src: Path, keep_layers: str, out_dir: Path, force: bool = False) -> dict:
    """Write ``out_dir`` holding the layers ``keep_layers`` selects from checkpoint ``src``; returns the
    stamp."""
    from transformers import AutoConfig

    src, out_dir = Path(src), Path(out_dir)
    if not (src / "config.json").is_file():
        raise ConfigError(f"SRC: {str(src)!r} is not a save_pretrained directory (no config.json)")
    config = AutoConfig.from_pretrained(src)
    num_layers = config.num_hidden_layers
    keep = parse_keep_layers(keep_layers, num_layers)
    key = {"source": str(src.resolve()), "keep_layers": keep}
    cached = read_stamp(out_dir, STAMP)
    if cached is not None and not force and {k: cached.get(k) for k in key} == key:
        log.info("pruned student cached at %s", out_dir)
        return cached
    if out_dir.resolve() == src.resolve():
        raise ConfigError("--out: must differ from SRC (the source is read while the student is written)")
    if out_dir.exists() and cached is None and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"--out {str(out_dir)!r} holds files opd did not write; "
                          "choose another directory or pass --force")
    with building(out_dir) as tmp:
        params = _write(src, config, keep, tmp)
        record = write_stamp(tmp, STAMP, {**key, "source_layers": num_layers, "params": params})
    log.info("kept layers %s of %d: %d parameters in %s", keep, num_layers, params, out_dir)
    return record


def _write(src: Path, config, keep: list[int], dest: Path) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    layers = source.get_decoder().layers
    prefix = next(name for name, module in source.named_modules() if module is layers) + "."
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in source.state_dict().items():
        if not name.startswith(prefix):
            state[name] = tensor
            continue
        old, rest = name[len(prefix):].split(".", 1)
        if int(old) in new_index:
            state[f"{prefix}{new_index[int(old)]}.{rest}"] = tensor
    pruned = config.to_dict()
    pruned["num_hidden_layers"] = len(keep)
    # per-layer lists (attention kinds, sliding windows) follow the layers
    for key, value in list(pruned.items()):
        if isinstance(value, list) and len(value) == config.num_hidden_layers and key != "architectures":
            pruned[key] = [value[i] for i in keep]
    new_config = type(config).from_dict(pruned)
    dtype = next(source.parameters()).dtype
    student = AutoModelForCausalLM.from_config(new_config, dtype=dtype)
    student.load_state_dict(state, strict=True)
    try:
        student.generation_config = GenerationConfig.from_pretrained(src)
    except OSError:
        pass  # no generation_config.json: the one from_config made is kept
    student.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return sum(p.numel() for p in student.parameters())
