"""Built-in verifiers, registered by name. Import-light on purpose (no torch, no Ray): they run in Ray workers
with ``num_cpus=0``, where pulling in a heavy framework per worker would cost more than the scoring itself."""

from __future__ import annotations

import re

from opd.rewards.registry import register
from opd.tasks.arithmetic import exact_answer, parse_completion

register("exact_answer")(exact_answer)

_DIGITS = re.compile(r"[0-9]+-?")


@register("format_digits")
def format_digits(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """1.0 when the completion's answer is only digits with an optional trailing '-', else 0.0.

    A shaping reward for the reversed-digit arithmetic task: it pays for the answer *format* even when the
    value is wrong, which gives a cold-start student a signal before it gets any answer exactly right.
    """
    return [1.0 if _DIGITS.fullmatch(parse_completion(c)) else 0.0 for c in completions]

# Registered by import; each keeps its heavy imports inside the function.
from opd.rewards import code_exec, math_answer  # noqa: E402,F401
