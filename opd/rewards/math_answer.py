"""The ``math_answer`` verifier: ``math-verify`` equivalence of a completion's final answer and the ground
truth.

``\\boxed{1/2}``, ``0.5``, ``\\frac{1}{2}`` and ``x = 1/2`` are all the same answer; so are ``\\{1, 2\\}`` and
``\\{2, 1\\}``, or ``x^2+2x+1`` and ``(x+1)^2``. The gold answer comes from the dataset column ``answer``.

Equivalence also credits an answer left for the grader to work out: ``14 + 11`` equals ``25``. Where the task
is the computation (arithmetic, word problems), that credits restating the question, and a policy trained
on it learns to (GRPO did, on SmolLM2 and "What is 14 + 11?", in 10 steps). ``number_only=True`` (the
verifier's ``kwargs``) scores such an answer 0: the final answer must be written as a number.

Threads: math-verify bounds each parse/compare with ``signal.alarm``, which only works on the main thread, and
the verifier hosts run every call on a worker thread. Off the main thread the signal timeouts are turned off
and the runner's per-call deadline (``verifiers.timeout_s``) is the bound instead: a pathological expression
that hangs sympy costs its chunk, and the host holding it is replaced. On the main thread (a direct call, a
notebook) the signal timeouts stay on.
"""

from __future__ import annotations

import re
import threading

from opd.rewards.registry import register

# Seconds per parse / per comparison when the signal timeout can be used (main thread only).
_MAIN_THREAD_TIMEOUT_S = 5
# A number as written: 25, -3, 2,500, 0.5, 3/4 (math-verify keeps "3/4" an unevaluated product).
_NUMBER = re.compile(r"[-+]?\d[\d,]*(\.\d+)?(/\d+)?")


@register("math_answer")
def math_answer(
    prompts: list[str], completions: list[str], answer: list[object] | None = None, number_only: bool = False,
    **_: object
) -> list[float | ValueError]:
    """1.0 when the completion's final answer equals the row's ``answer`` mathematically, else 0.0; with
    ``number_only``, 0.0 as well when that answer is not written as a number (``14 + 11``).

    A completion with no parseable answer scores 0.0 (the model's fault). A gold answer that does not parse is
    the dataset's fault, not the model's: that row gets a ``ValueError`` quoting the gold text, which the
    runner records as the row's failure reason instead of a silent 0.
    """
    if answer is None:
        raise ValueError("math_answer needs a dataset column 'answer' with the ground truth")
    if len(answer) != len(completions):
        raise ValueError(f"math_answer: {len(answer)} answers for {len(completions)} completions")
    from math_verify import parse, verify  # sympy is heavy; only hosts that use this verifier pay for it

    timeout = _MAIN_THREAD_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    scores: list[float | ValueError] = []
    for completion, gold_text in zip(completions, answer, strict=True):
        gold = _parse_gold(parse, gold_text, timeout)
        if not gold:
            scores.append(ValueError(f"math-verify cannot parse the gold answer {gold_text!r} "
                                     "(column 'answer')"))
            continue
        pred = parse(str(completion), parsing_timeout=timeout)
        # verify(gold, pred): the order matters (math-verify treats the gold side specially for `x = ...`).
        written = bool(pred) and (not number_only or _is_number(pred))
        scores.append(1.0 if written and verify(gold, pred, timeout_seconds=timeout) else 0.0)
    return scores


def _is_number(parsed: list) -> bool:
    """Whether math-verify's answer was written as a number: a sympy number (``\\frac{1}{2}`` is one) or
    number text."""
    value, text = parsed[0], str(parsed[-1]).strip().rstrip(".")
    return bool(getattr(value, "is_Number", False)) or _NUMBER.fullmatch(text.replace(" ", "")) is not None


def _parse_gold(parse, gold_text: object, timeout: int | None) -> list:
    """The parsed gold answer, or [] when it has no mathematical value.

    A bare gold such as ``2x+1`` or ``(1, 2)`` parsed as free text yields only its last number; read as LaTeX
    math it is the whole expression, so a gold without its own delimiters is wrapped in ``$...$`` first.
    """
    text = str(gold_text).strip()
    if not text:
        return []
    delimited = "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text
    parsed = parse(text if delimited else f"${text}$", parsing_timeout=timeout)
    if not _has_value(parsed) and not delimited:
        parsed = parse(text, parsing_timeout=timeout)
    # A result of only strings is math-verify's "first match" fallback: the text, with no value to compare.
    return parsed if _has_value(parsed) else []


def _has_value(parsed: list) -> bool:
    return any(not isinstance(p, str) for p in parsed)
