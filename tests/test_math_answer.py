"""The ``math_answer`` built-in verifier: math-verify equivalence, called directly and through the real
runner."""

from __future__ import annotations

import threading

import pytest

from opd.rewards import VerifierRunner, VerifierSpec, resolve
from opd.rewards.math_answer import math_answer

EQUIVALENT = [  # (gold, completion)
    ("0.5", "The answer is \\boxed{1/2}."),
    ("\\frac{1}{2}", "so we get $0.5$"),
    ("1/2", "Therefore \\boxed{\\frac{1}{2}}"),
    ("\\boxed{1/2}", "$\\dfrac{2}{4}$"),
    ("2", "Solving, $x = 2$."),
    ("x=2", "\\boxed{2}"),
    ("\\{1, 2\\}", "The solutions are $\\{2, 1\\}$"),
    ("[1, 2)", "\\boxed{[1,2)}"),
    ("x^2+2x+1", "\\boxed{(x+1)^2}"),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}"),
    ("2x+1", "$1 + 2x$"),
    (7, "7"),  # a non-string gold (an int column) is read as its text
]

NOT_EQUIVALENT = [
    ("0.5", "\\boxed{1/3}"),
    ("3", "The answer is 4"),
    ("(1, 2)", "\\boxed{[1, 2]}"),  # open vs closed interval
    ("x^2+2x+1", "\\boxed{(x-1)^2}"),
    ("2x+1", "$2$"),  # the gold is the whole expression, not its first number
    ("\\{1, 2\\}", "$\\{1, 2, 3\\}$"),
    ("5", "I don't know."),  # no parseable answer
    ("5", ""),
]


def _score(golds, completions):
    return math_answer(["q"] * len(completions), completions, answer=list(golds))


@pytest.mark.parametrize(("gold", "completion"), EQUIVALENT)
def test_equivalent_answers_score_one(gold, completion):
    assert _score([gold], [completion]) == [1.0]


@pytest.mark.parametrize(("gold", "completion"), NOT_EQUIVALENT)
def test_different_or_missing_answers_score_zero(gold, completion):
    assert _score([gold], [completion]) == [0.0]


# (gold, completion, score with number_only, score by equivalence alone): an answer left for the grader to
# compute is not an answer to an arithmetic question; the same number written any way a number is written is.
NUMBER_ONLY = [
    ("25", "14 + 11", 0.0, 1.0),
    ("25", "The answer is 14 + 11.", 0.0, 1.0),
    ("25", "$10+15$", 0.0, 1.0),
    ("25", "14 + 11 = 25", 1.0, 1.0),
    ("25", "Tom has 25 apples now.", 1.0, 1.0),
    ("25", "\\boxed{25}", 1.0, 1.0),
    ("25", "25.0", 1.0, 1.0),
    ("-3", "The answer is -3.", 1.0, 1.0),
    ("2500", "2,500", 1.0, 1.0),
    ("1/2", "3/6", 1.0, 1.0),
    ("1/2", "\\frac{1}{2}", 1.0, 1.0),
    ("25", "26", 0.0, 0.0),
]


@pytest.mark.parametrize(("gold", "completion", "strict", "lenient"), NUMBER_ONLY)
def test_number_only_refuses_an_unevaluated_answer(gold, completion, strict, lenient):
    assert math_answer(["q"], [completion], answer=[gold], number_only=True) == [strict]
    assert _score([gold], [completion]) == [lenient]


def test_unparseable_gold_is_a_per_row_error():
    out = _score(["1/2", "@@##", "  "], ["\\boxed{0.5}", "1", "1"])
    assert out[0] == 1.0
    assert isinstance(out[1], ValueError) and "gold answer '@@##' (column 'answer')" in str(out[1])
    assert isinstance(out[2], ValueError) and "'  '" in str(out[2])


def test_missing_answer_column_is_a_clear_error():
    with pytest.raises(ValueError, match="column 'answer'"):
        math_answer(["q"], ["1"])


def test_works_off_the_main_thread():
    """The verifier hosts call verifiers on worker threads, where math-verify's signal timeouts would
    raise."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=_score(["0.5", "3"], ["\\boxed{1/2}", "4"])))
    thread.start()
    thread.join(60)
    assert result["out"] == [1.0, 0.0]


def test_registered_as_builtin():
    assert resolve("math_answer") is math_answer


def test_through_the_verifier_runner(local_ray):
    uids = ["p0/g0", "p0/g1", "p1/g0", "p2/g0", "p3/g0"]
    completions = ["so \\boxed{\\frac{1}{2}}", "\\boxed{0.25}", "$x = 3$", "no idea", "\\boxed{1}"]
    columns = {"answer": ["0.5", "0.5", "3", "\\{1,2\\}", "@@##"]}
    runner = VerifierRunner([VerifierSpec("math_answer")], chunk_size=2, timeout_s=60)
    out = runner.score(uids, ["q"] * 5, completions, columns)
    assert out.per_verifier["math_answer"] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert out.correct == [True, False, True, False, False]
    # Only the bad gold row failed, with the reason; the rest of its chunk scored normally.
    assert list(out.failures) == ["p3/g0"]
    assert out.failures["p3/g0"] == (
        "math_answer: ValueError: math-verify cannot parse the gold answer '@@##' (column 'answer')"
    )
    # kwargs reach the function through the runner (the shipped configs' number_only)
    strict = VerifierRunner([VerifierSpec("math_answer", kwargs={"number_only": True})], chunk_size=2,
                            timeout_s=60)
    out = strict.score(uids[:2], ["q"] * 2, ["14 + 11", "14 + 11 = 25"], {"answer": ["25", "25"]})
    assert out.per_verifier["math_answer"] == [0.0, 1.0]
