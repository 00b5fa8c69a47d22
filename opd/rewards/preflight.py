"""The pre-flight of a job's verifiers: each resolved (``opd.rewards.spec``), its signature bound to the
dataset's columns and called on real held-out rows, judged by the rules a run judges each call by.
``opd.preflight`` runs it before Ray starts; each problem is a ``ConfigError`` line naming the key."""

from __future__ import annotations

import inspect
import logging
import threading

from opd.errors import ConfigError
from opd.rewards.spec import bad_value, resolve_specs, scores_problem
from opd.types import Prompt

logger = logging.getLogger(__name__)


def _call(fn, args: tuple, columns: dict, kwargs: dict, timeout_s: float) -> tuple[str, object]:
    """("ok", value) | ("raised", exception) | ("timeout", None): one call on a daemon thread, so a verifier
    that hangs delays the start by at most its deadline (the run's deadlines then handle it as a fault)."""
    from opd.rewards.runner import call_verifier

    box: dict = {}

    def target() -> None:
        try:
            box["ok"] = call_verifier(fn, *args, columns, kwargs)
        except Exception as e:  # noqa: BLE001 - reported to the user as the verifier's own error
            box["raised"] = e

    t = threading.Thread(target=target, daemon=True, name="opd-verifier-preflight")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        return "timeout", None
    return ("ok", box["ok"]) if "ok" in box else ("raised", box["raised"])


def check_verifiers(cfg, rows: Prompt | list[Prompt]) -> list:
    """Every verifier of ``verifiers.functions`` resolved (``opd.rewards.spec``), its signature bound to
    ``(prompts, completions, **columns, **kwargs)`` with this dataset's columns, and called once on ``rows``
    (the first two held-out rows) with their ground truths as the completions: the call must return one usable
    score per row, judged by the rules the run judges each call by. Returns the functions."""
    rows = [rows] if isinstance(rows, Prompt) else list(rows)
    where = (f"test row 0 ({rows[0].columns['prompt']!r})" if len(rows) == 1
             else f"test rows 0-{len(rows) - 1}")
    columns = {k: [r.columns.get(k) for r in rows] for k in rows[0].columns if k != "prompt"}
    args = ([str(r.columns["prompt"]) for r in rows], [str(r.answer) for r in rows])
    fns, problems = resolve_specs(cfg.verifiers.functions)
    for i, (entry, fn) in enumerate(zip(cfg.verifiers.functions, fns, strict=True)):
        if fn is None:
            continue  # named in problems
        key = f"verifiers.functions.{i}.name"
        try:
            inspect.signature(fn).bind(*args, **columns, **entry.kwargs)
        except TypeError as e:
            problems.append(f"  {key}: {entry.name!r} cannot be called as fn(prompts, completions, "
                            f"{', '.join(f'{k}=' for k in {**columns, **entry.kwargs})}): {e}")
            continue
        except ValueError:
            pass  # no signature to inspect (a builtin or C function): the call below decides
        status, out = _call(fn, args, columns, entry.kwargs, cfg.verifiers.timeout_s)
        if status == "raised":
            problems.append(f"  {key}: {entry.name!r} raised on {where}: {type(out).__name__}: {out}")
        elif status == "timeout":
            logger.warning("%s: %r did not return within verifiers.timeout_s=%gs on %s; the run treats "
                           "such calls as failed rows", key, entry.name, cfg.verifiers.timeout_s, where)
        elif why := scores_problem(out, len(rows)) or next(filter(None, map(bad_value, out)), None):
            problems.append(f"  {key}: {entry.name!r} {why} (called on {where})")
    if problems:
        raise ConfigError("invalid config:\n"
                          + "\n".join(p if p.startswith("  ") else f"  {p}" for p in problems))
    return [f for f in fns if f is not None]
