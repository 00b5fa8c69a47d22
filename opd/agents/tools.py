"""Tools an episode's environment offers: a name, a JSON schema and a per-call timeout around a function.

A TRL-style plain function becomes a tool with ``Tool.from_function``: its schema comes from the signature and
the Google-style docstring (transformers' ``get_json_schema``, as TRL's GRPO tools do). Built-ins: ``calc``
(one arithmetic operation per call) and ``python`` (a snippet in the ``code_exec`` sandbox,
docs/sandbox.md).

A call never raises into the episode: ``Tool.call`` runs the function on its own daemon thread and returns a
``ToolResult`` with the text, or the error (bad arguments, an exception, a timeout) as the text the model
reads. A hung function is abandoned at its timeout (a thread cannot be killed; the ``python`` tool's sandbox
ends itself at its own wall clock).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

ToolStatus = Literal["ok", "error", "timeout"]


@dataclass(frozen=True)
class ToolResult:
    text: str
    status: ToolStatus = "ok"


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., object]
    schema: dict  # OpenAI/transformers function schema: {"type": "function", "function": {...}}
    timeout_s: float = 10.0
    required: tuple[str, ...] = field(default=())

    @staticmethod
    def from_function(fn: Callable, timeout_s: float = 10.0) -> Tool:
        """A plain function as a tool (``transformers.utils.get_json_schema``: type hints and a docstring
        with an ``Args:`` section); raises ``ValueError`` naming the function when its schema cannot be
        made."""
        from transformers.utils import get_json_schema

        try:
            schema = get_json_schema(fn)
        except Exception as e:  # transformers' DocstringParsingException, TypeHintParsingException
            raise ValueError(f"tool {getattr(fn, '__name__', fn)!r}: no JSON schema from its signature and "
                             f"docstring: {e}") from e
        params = schema["function"].get("parameters", {})
        return Tool(schema["function"]["name"], fn, schema, timeout_s, tuple(params.get("required", ())))

    def check(self, arguments: object) -> str | None:
        """Why these arguments cannot be passed (None when they can): not an object, a required one missing,
        or one the schema does not name."""
        if not isinstance(arguments, dict):
            return f"arguments must be a JSON object, got {type(arguments).__name__}"
        props = self.schema["function"].get("parameters", {}).get("properties", {})
        missing = [k for k in self.required if k not in arguments]
        unknown = [k for k in arguments if k not in props]
        if missing or unknown:
            return (f"tool {self.name}: " + "; ".join(
                ([f"missing argument(s) {missing}"] if missing else [])
                + ([f"unknown argument(s) {unknown}; it takes {sorted(props)}"] if unknown else [])))
        return None

    def call(self, arguments: dict) -> ToolResult:
        bad = self.check(arguments)
        if bad:
            return ToolResult(f"error: {bad}", "error")
        box: dict = {}

        def run() -> None:
            try:
                box["out"] = self.fn(**arguments)
            except Exception as e:  # the model's call failed: an observation, not a crash
                box["err"] = f"error: {type(e).__name__}: {e}"

        t = threading.Thread(target=run, name=f"tool-{self.name}", daemon=True)
        t.start()
        t.join(self.timeout_s)
        if t.is_alive():
            return ToolResult(f"error: tool {self.name} timed out after {self.timeout_s:g}s", "timeout")
        if "err" in box:
            return ToolResult(box["err"], "error")
        out = box.get("out")
        return ToolResult(out if isinstance(out, str) else json.dumps(out))


def calc(a: float, op: str, b: float) -> str:
    """One arithmetic operation on two numbers.

    Args:
        a: the left operand
        op: one of + - * /
        b: the right operand
    """
    a, b = float(a), float(b)
    ops = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}
    if op not in ops:
        raise ValueError(f"op must be one of + - * /, got {op!r}")
    r = ops[op]()
    return str(int(r)) if float(r).is_integer() else f"{r:.6g}"


def python(code: str) -> str:
    """Run a Python snippet in a sandbox and return what it prints.

    Args:
        code: the program; print the result
    """
    from opd.rewards.sandbox import SandboxLimits, run_sandboxed

    r = run_sandboxed(code, limits=SandboxLimits(wall_s=5.0, cpu_s=2.0, max_output_bytes=16 * 1024))
    if r.ok:
        return r.stdout
    return f"{r.stdout}{r.stderr[-2000:]}\n[{r.reason}]"


BUILTIN_TOOLS: dict[str, Callable] = {"calc": calc, "python": python}
