"""One verifier spec record and its one validation, used by the config, the pre-flight and the runner alike.

``VerifierSpec`` is an entry of ``verifiers.functions`` (pydantic validates it as a config entry) and what
``VerifierRunner`` runs. ``spec_problems`` refuses what no run can use (no verifier, a name twice, a
non-finite weight), ``resolve_specs`` turns names into functions, ``scores_problem`` and ``bad_value`` judge
what a call returned. Each message names the dotted key. Free of Ray and torch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import ConfigDict

from opd.rewards.registry import Verifier, VerifierSpecError, resolve

KEY = "verifiers.functions"


@dataclass
class VerifierSpec:
    """One verifier: a spec string for ``resolve``, the weight of its score in the reward, and extra keyword
    arguments bound to the function (like ``functools.partial``)."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str  # registered name, "package.module:function" or "path/to/file.py:function"
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the function

    @classmethod
    def parse(cls, obj: object) -> VerifierSpec:
        """Accept ``"name"``, ``{"name": ..., "weight": ..., "kwargs": ...}`` or a ``VerifierSpec``."""
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, str):
            return cls(obj)
        if (isinstance(obj, dict) and set(obj) <= {"name", "weight", "kwargs"} and "name" in obj
                and isinstance(obj.get("kwargs", {}), dict)):
            return cls(str(obj["name"]), float(obj.get("weight", 1.0)), dict(obj.get("kwargs", {})))
        raise VerifierSpecError(f"verifier entry must be a name or {{name, weight, kwargs}}, got {obj!r}")


def spec_problems(specs: list[VerifierSpec]) -> list[str]:
    """What makes this list of verifiers unusable, one message per problem (empty: none)."""
    if not specs:
        return [f"{KEY}: at least one verifier is required (the first one is the correctness check)"]
    problems = []
    names = [s.name for s in specs]
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{KEY}.{i}.name: must be a non-empty string (got {name!r})")
    if dups := sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{KEY} lists {dups} more than once (their scores are keyed by name)")
    for i, s in enumerate(specs):
        if not isinstance(s.weight, numbers.Real) or not math.isfinite(s.weight):
            problems.append(f"{KEY}.{i}.weight: must be a finite number (got {s.weight!r})")
    return problems


def resolve_specs(specs: list[VerifierSpec]) -> tuple[list[Verifier | None], list[str]]:
    """Each spec's function (None where it does not resolve) and one message per spec that does not."""
    fns: list[Verifier | None] = []
    problems = []
    for i, s in enumerate(specs):
        try:
            fns.append(resolve(s.name))
        except VerifierSpecError as e:
            fns.append(None)
            hint = ("; a module is imported from the current directory and PYTHONPATH, "
                    "a file path from anywhere"
                    if ":" in s.name and "no module named" in str(e) else "")
            problems.append(f"{KEY}.{i}.name: {e}{hint}")
    return fns, problems


def checked(specs: list[object]) -> tuple[list[VerifierSpec], list[Verifier]]:
    """The specs parsed, validated and resolved, or ``VerifierSpecError`` listing every problem."""
    parsed = [VerifierSpec.parse(s) for s in specs]
    problems = spec_problems(parsed)
    fns, unresolved = resolve_specs(parsed) if not problems else ([], [])
    if problems or unresolved:
        raise VerifierSpecError("; ".join(problems + unresolved))
    return parsed, fns


def scores_problem(out: object, rows: int) -> str | None:
    """Why what one call returned for ``rows`` rows is not a list of that many scores (None when it is)."""
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        return f"returned {type(out).__name__}, not a list of scores"
    if len(out) != rows:
        return f"returned {len(out)} scores for {rows} rows"
    return None


def bad_value(value: object) -> str | None:
    """Why a single returned value is not a usable score, or None when it is."""
    if value is None:
        return "returned None"
    # a verifier's per-row error (e.g. math_answer on a gold it cannot parse)
    if isinstance(value, Exception):
        return f"{type(value).__name__}: {value}"
    if not isinstance(value, numbers.Real):
        return f"returned non-number {value!r} ({type(value).__name__})"
    if not math.isfinite(float(value)):
        return f"returned non-finite value {float(value)}"
    return None
