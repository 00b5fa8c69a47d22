"""What a checkpoint directory's files say, read without torch: whether its weights are whole, the names of
its modules, its position limit and whether its tokenizer carries a chat template. The pre-flight asks these
before anything loads, so a partial download or a base model without a template is a message naming the key,
not a traceback from an actor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_INDEX = "model.safetensors.index.json"
_HEADER_LIMIT = 100 << 20  # a safetensors JSON header past this is a damaged file, not a large model


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The file's tensor table and the bytes its tensors need (header included); ValueError says what is
    wrong."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _HEADER_LIMIT):
            raise ValueError(f"its header claims {n} bytes and the file has {size}")
        try:
            table = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"its header is not JSON ({e})") from None
    ends = [t["data_offsets"][1] for k, t in table.items()
            if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
    return table, 8 + n + max(ends, default=0)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the weights (every shard an index names), or none (pytorch_model.bin,
    ...)."""
    index = model_dir / _INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    return [single] if single.exists() else []


def weight_problems(model_dir: Path) -> list[str]:
    """Why the weights cannot load: a shard missing, or a file shorter than its own header says (a partial
    copy)."""
    try:
        files = weight_files(model_dir)
    except (OSError, ValueError) as e:
        return [f"{_INDEX} cannot be read ({e})"]
    problems = []
    for path in files:
        if not path.is_file():
            problems.append(f"{path.name} is missing")
            continue
        try:
            _, needed = _safetensors_header(path)
        except (OSError, ValueError) as e:
            problems.append(f"{path.name} is damaged: {e}")
            continue
        if (have := path.stat().st_size) < needed:
            problems.append(f"{path.name} is truncated: its header needs {needed} bytes and the file has "
                            f"{have} (an interrupted download or copy?)")
    return problems


def module_names(model_dir: Path) -> set[str] | None:
    """Dotted names of the modules holding weights (``model.layers.0.self_attn.q_proj``), from the safetensors
    headers; None when the weights are not safetensors. A tied LM head has no weights of its own and is
    added."""
    files = weight_files(model_dir)
    if not files:
        return None
    names = set()
    for path in files:
        table, _ = _safetensors_header(path)
        names |= {k.rpartition(".")[0] for k in table if k != "__metadata__"}
    config = model_config(model_dir)
    if config.get("tie_word_embeddings"):
        names.add("lm_head")
    return names


def model_config(model_dir: Path) -> dict:
    try:
        value = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # an unreadable config.json is the loader's error to report, with its own message
    return value if isinstance(value, dict) else {}


def max_positions(model_dir: Path) -> int | None:
    value = model_config(model_dir).get("max_position_embeddings")
    return value if isinstance(value, int) else None


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).is_file()
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer saved there carries a chat template (in any of the files transformers saves it
    to)."""
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))
