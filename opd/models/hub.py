"""Models where users keep them: a model key's value that is not a local path is a Hugging Face hub id, with
an optional ``@revision`` (a branch, a tag or a commit), as TRL, verl and OpenRLHF take it.

The driver resolves every model key once, before Ray starts (``resolve_models``): the local cache first, then
the hub unless ``HF_HUB_OFFLINE`` is set (a token comes from the environment, as ``huggingface_hub`` reads
it), and every role then loads the resolved snapshot directory. A snapshot's path names its commit
(``.../models--ORG--NAME/snapshots/SHA``), so nodes that resolve the same revision into the same ``HF_HOME``
load the same files; ``pins`` gives each hub id pinned to the commit it resolved to, which ``opd submit``
sends to the cluster. Imports no torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from opd.errors import ConfigError

_REPO = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# What a role loads from a model repo: its config, weights, tokenizer and chat template (not other formats'
# weights).
WEIGHTS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
TOKENIZER = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]  # a remote teacher's: no weights


def is_hub_id(value: str) -> bool:
    """``ORG/NAME`` or ``NAME`` (with an optional ``@revision``) that is not a path on this machine."""
    if not value or value.startswith(("/", ".", "~")) or Path(value).expanduser().exists():
        return False
    repo, _, revision = value.partition("@")
    return bool(_REPO.fullmatch(repo)) and "@" not in revision


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(key: str, value: str, weights: bool = True) -> str:
    """The local snapshot directory of hub id ``value`` (``ConfigError`` naming ``key`` and the id if there is
    none)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = value.partition("@")
    patterns = WEIGHTS if weights else TOKENIZER
    try:
        return snapshot_download(repo, revision=revision or None, local_files_only=True,
                                 allow_patterns=patterns)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass  # not in the cache (or not this revision)
    where = f"the Hugging Face cache ({_cache_dir()})"
    if offline():
        at = f" at revision {revision!r}" if revision else ""
        raise ConfigError(f"{key}: {value!r} is not a local directory, and {where} does not hold it{at}; "
                          "HF_HUB_OFFLINE is set, so it cannot be downloaded (download it where the hub is "
                          "reachable, or give a local directory)") from None
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=patterns)
    except RevisionNotFoundError:
        raise ConfigError(f"{key}: {value!r}: the hub has no revision {revision!r} of {repo!r}") from None
    except GatedRepoError:
        why = "is gated: accept its licence on the hub and set HF_TOKEN"
        raise ConfigError(f"{key}: {value!r} {why}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: {value!r} is not a local directory, and the hub has no model {repo!r} "
                          "(or it is private: set HF_TOKEN)") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ConfigError(f"{key}: {value!r} is not a local directory, not in {where}, and the hub could not "
                          f"be reached ({type(e).__name__}: {str(e)[:200]})") from None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def commit_of(snapshot: str) -> str:
    """The commit a snapshot directory holds (its name)."""
    return Path(snapshot).name


def resolve_models(cfg):
    """``(cfg with every hub id replaced by its snapshot directory, pins: key -> "ORG/NAME@COMMIT")``. A
    remote teacher's repo (``teacher.url``) is fetched for its tokenizer only."""
    snapshots: dict[str, str] = {}
    pins: dict[str, str] = {}
    remote_teacher = cfg.teacher.url is not None and not cfg.teacher_signal.learner_runs_teacher
    for key, value in model_keys(cfg):
        if value is None or not is_hub_id(value):
            continue
        snapshots[key] = resolve(key, value, weights=not (remote_teacher and key == "models.teacher"))
        pins[key] = f"{value.partition('@')[0]}@{commit_of(snapshots[key])}"
    return cfg.with_keys(snapshots), pins


def model_keys(cfg) -> list[tuple[str, str | None]]:
    """Every config key that names a model: the student, the teachers and each section's reference."""
    keys = [("models.student", cfg.models.student), ("models.teacher", cfg.models.teacher)]
    keys += [(f"models.teachers.{n}", d) for n, d in cfg.models.teachers.items()]
    keys += [(f"{name}.reference", section.get("reference")) for name, section in cfg.model_dump().items()
             if isinstance(section, dict) and "reference" in section]
    return keys
