"""Verifiers (TRL-style reward functions): a name registry, spec resolution and a Ray runner.

``register``/``resolve``/``VerifierSpecError`` come from the Ray-free ``registry``, ``VerifierSpec`` from the
Ray-free
``spec``; ``VerifierRunner`` lives in ``runner``, which imports Ray, so it is loaded on first access. That
keeps
``import opd.rewards`` cheap for code (and Ray workers) that only registers or resolves verifiers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opd.rewards.registry import VerifierSpecError, register, registered_names, resolve
from opd.rewards.spec import VerifierSpec

if TYPE_CHECKING:
    from opd.rewards.runner import VerifierRunner

__all__ = ["VerifierRunner", "VerifierSpec", "VerifierSpecError", "register", "registered_names", "resolve"]


def __getattr__(name: str):
    if name == "VerifierRunner":
        from opd.rewards import runner

        return runner.VerifierRunner
    raise AttributeError(f"module 'opd.rewards' has no attribute {name!r}")
