"""Name -> verifier function, and ``resolve()`` that turns a config string into the function.

A verifier is a TRL-style reward function::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` are the dataset columns as lists aligned with ``prompts`` (e.g. ``answer=[...]``); the function
may be sync or ``async def``. Keeping the contract identical to TRL means reward functions written for TRL
drop in as-is.

A spec string is one of:

* a registered name (``exact_answer``),
* ``package.module:function`` (imported; ``function`` may be dotted, e.g. ``Class.method``),
* ``path/to/file.py:function`` (loaded from the file; a relative path is taken against the current directory).

This module stays free of Ray (and torch) so configs can be checked and verifiers unit-tested without a
cluster; running them is ``opd.rewards.runner``'s job.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

Verifier = Callable[..., object]

# Set on modules loaded by path: such modules are not importable by name in a Ray worker, so the runner ships
# them by value (cloudpickle) instead of by reference.
FILE_MODULE_MARK = "__opd_verifier_file__"

_REGISTRY: dict[str, Verifier] = {}
_BUILTINS_LOADED = False


class VerifierSpecError(ValueError):
    """A verifier spec that does not resolve to a callable (says which spec and why)."""


def register(name: str) -> Callable[[Verifier], Verifier]:
    """Decorator adding ``fn`` to the registry under ``name``; returns ``fn`` unchanged.

    Registering a different function under a taken name is an error (two plugins silently overriding each
    other would change the reward without anyone noticing); re-registering the same function (a module reload)
    is fine.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise VerifierSpecError(f"verifier name must be a non-empty string without ':', got {name!r}")

    def decorator(fn: Verifier) -> Verifier:
        if not callable(fn):
            raise VerifierSpecError(f"register({name!r}): {fn!r} is not callable")
        old = _REGISTRY.get(name)
        if old is not None and _identity(old) != _identity(fn):
            raise VerifierSpecError(
                f"verifier name {name!r} is already registered to {_identity(old)}; "
                f"cannot register {_identity(fn)}"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_names() -> list[str]:
    """Sorted names that ``resolve`` accepts without a ':' (built-ins included)."""
    _load_builtins()
    return sorted(_REGISTRY)


def resolve(spec: str) -> Verifier:
    """The callable a spec string names; raises ``VerifierSpecError`` explaining what is missing."""
    if not isinstance(spec, str) or not spec.strip():
        raise VerifierSpecError(f"verifier spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        _load_builtins()
        if spec not in _REGISTRY:
            raise VerifierSpecError(
                f"unknown verifier {spec!r}; registered verifiers: {sorted(_REGISTRY)} "
                "(or use 'package.module:function' / 'path/to/file.py:function')"
            )
        return _REGISTRY[spec]
    # Split on the LAST ':' so a Windows drive letter ('C:\\x.py:fn') stays in the path.
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise VerifierSpecError(f"verifier spec {spec!r}: expected 'module:function' or 'file.py:function'")
    is_file = file_spec(spec) is not None
    module = _load_file(target, spec) if is_file else _import_module(target, spec)
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = f"file {target!r}" if is_file else f"module {target!r}"
            raise VerifierSpecError(f"verifier spec {spec!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise VerifierSpecError(f"verifier spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def file_spec(spec: str) -> tuple[str, str] | None:
    """``(path, function)`` when ``spec`` names a function in a file (``path/to/file.py:function``), else
    None."""
    target, _, attr = spec.strip().rpartition(":")
    if target and attr and (target.endswith(".py") or "/" in target or os.sep in target):
        return target, attr
    return None


def _identity(fn: Verifier) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _load_builtins() -> None:
    # Imported on first use rather than at import time: builtins pull in the task module (and its `datasets`
    # import), which a caller that only registers its own verifiers should not pay for.
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        importlib.import_module("opd.rewards.builtins")
        _BUILTINS_LOADED = True


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise VerifierSpecError(f"verifier spec {spec!r}: no module named {name!r}") from e
        raise VerifierSpecError(f"verifier spec {spec!r}: importing module {name!r} failed: {e}") from e
    except Exception as e:
        raise VerifierSpecError(
            f"verifier spec {spec!r}: importing module {name!r} failed: {type(e).__name__}: {e}"
        ) from e


def _load_file(path: str, spec: str):
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise VerifierSpecError(f"verifier spec {spec!r}: file {full!r} does not exist")
    # One module per file path, cached in sys.modules: resolving the same file twice gives the same function
    # objects, and cloudpickle's by-value registration needs the module to be in sys.modules.
    stem = os.path.splitext(os.path.basename(full))[0]
    safe = "".join(c if c.isalnum() else "_" for c in stem)
    mod_name = f"_opd_verifier_{safe}_{hashlib.sha1(full.encode()).hexdigest()[:10]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    file_spec = importlib.util.spec_from_file_location(mod_name, full)
    if file_spec is None or file_spec.loader is None:
        raise VerifierSpecError(f"verifier spec {spec!r}: cannot load {full!r} as a Python module")
    module = importlib.util.module_from_spec(file_spec)
    setattr(module, FILE_MODULE_MARK, full)
    sys.modules[mod_name] = module
    try:
        file_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise VerifierSpecError(
            f"verifier spec {spec!r}: executing file {full!r} failed: {type(e).__name__}: {e}"
        ) from e
    return module
