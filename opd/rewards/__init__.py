"""Verifiers (TRL-style reward functions): a name registry, spec resolution and a Ray runner.

``register``/``resolve``/``VerifierSpecError`` come from the Ray-free ``registry``; ``VerifierRunner`` and
``VerifierSpec`` live in ``runner``, which imports Ray, so they are loaded on first access. That keeps
``import opd.rewards`` cheap for code (and Ray workers) that only registers or resolves verifiers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opd.rewards.registry import VerifierSpecError, register, registered_names, resolve

if TYPE_CHECKING:
    from opd.rewards.runner import VerifierRunner, VerifierSpec

__all__ = ["VerifierRunner", "VerifierSpec", "VerifierSpecError", "register", "registered_names", "resolve"]


def __getattr__(name: str):
    if name in ("VerifierRunner", "VerifierSpec"):
        from opd.rewards import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'opd.rewards' has no attribute {name!r}")
