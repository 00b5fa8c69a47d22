"""Verifier registry (no Ray) and VerifierRunner against a real local Ray.

Test verifiers live in a file written under tmp_path and are named as 'file.py:function', the same route a
user's own verifier takes: a Ray worker cannot import this test module, so it also checks they are shipped by
value.
"""

from __future__ import annotations

import math
import textwrap
import time

import pytest
import ray

from opd.rewards import VerifierRunner, VerifierSpec, VerifierSpecError, register, resolve
from opd.tasks import arithmetic

VERIFIERS = textwrap.dedent(
    """
    import asyncio, math, os, time

    def length(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    async def async_length(prompts, completions, **_):
        await asyncio.sleep(0.01)
        return [float(len(c)) * 10 for c in completions]

    def boom(prompts, completions, **_):
        raise RuntimeError("verifier exploded")

    def hang(prompts, completions, **_):
        time.sleep(60)
        return [1.0] * len(prompts)

    def exit_process(prompts, completions, **_):
        os._exit(3)

    def short(prompts, completions, **_):
        return [1.0] * (len(prompts) - 1)

    def nan_on_bad(prompts, completions, **_):
        return [math.nan if c == "bad" else 1.0 for c in completions]

    NOT_CALLABLE = 3
    """
)


@pytest.fixture(scope="module")
def vfile(tmp_path_factory):
    path = tmp_path_factory.mktemp("verifiers") / "my_verifiers.py"
    path.write_text(VERIFIERS)
    return path


# ---------------------------------------------------------------- registry (no Ray)


def test_resolve_registered_builtins():
    assert resolve("exact_answer") is arithmetic.exact_answer
    fmt = resolve("format_digits")
    assert fmt(["p"] * 5, ["861", "12-", "8a1", "", "-12"]) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert fmt(["p"], ["  42 trailing words"]) == [
        1.0
    ]  # the answer is the first word, as exact_answer reads it


def test_resolve_module_function():
    assert resolve("opd.tasks.arithmetic:exact_answer") is arithmetic.exact_answer
    assert resolve("opd.tasks.arithmetic:parse_completion")(" 12 x") == "12"


def test_resolve_file_function(vfile, tmp_path, monkeypatch):
    fn = resolve(f"{vfile}:length")
    assert fn(["a", "b"], ["xyz", ""]) == [3.0, 0.0]
    assert resolve(f"{vfile}:length") is fn  # one module per file: resolving twice gives the same object
    monkeypatch.chdir(vfile.parent)
    assert resolve("my_verifiers.py:length") is fn  # relative to the current directory


def test_unknown_name_lists_valid_names():
    with pytest.raises(VerifierSpecError) as err:
        resolve("exact_answr")
    msg = str(err.value)
    assert "exact_answr" in msg and "exact_answer" in msg and "format_digits" in msg
    assert isinstance(err.value, ValueError)


def test_missing_attribute_module_and_file(vfile, tmp_path):
    with pytest.raises(VerifierSpecError, match=r"module 'opd.tasks.arithmetic' has no attribute 'nope'"):
        resolve("opd.tasks.arithmetic:nope")
    with pytest.raises(VerifierSpecError, match="has no attribute 'nope'"):
        resolve(f"{vfile}:nope")
    with pytest.raises(VerifierSpecError, match="not a callable"):
        resolve(f"{vfile}:NOT_CALLABLE")
    with pytest.raises(VerifierSpecError, match="no module named 'opd.no_such_module'"):
        resolve("opd.no_such_module:fn")
    with pytest.raises(VerifierSpecError, match="does not exist"):
        resolve(f"{tmp_path / 'absent.py'}:fn")


def test_file_that_fails_to_import(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("raise ImportError('missing dependency xyz')\n")
    with pytest.raises(VerifierSpecError, match="ImportError: missing dependency xyz"):
        resolve(f"{bad}:fn")


def test_register_decorator_and_conflict():
    @register("test_rewards_always_half")
    def half(prompts, completions, **_):
        return [0.5] * len(prompts)

    assert resolve("test_rewards_always_half") is half
    with pytest.raises(VerifierSpecError, match="already registered"):
        register("test_rewards_always_half")(lambda p, c, **_: [0.0] * len(p))


def test_runner_validates_specs_at_construction(vfile):
    with pytest.raises(VerifierSpecError,
                       match=r"verifiers.functions.1.name: unknown verifier 'no_such_verifier'"):
        VerifierRunner([VerifierSpec("exact_answer"), VerifierSpec("no_such_verifier")])
    with pytest.raises(VerifierSpecError, match=r"lists \['exact_answer'\] more than once"):
        VerifierRunner([VerifierSpec("exact_answer"), VerifierSpec("exact_answer", 2.0)])
    with pytest.raises(VerifierSpecError):
        VerifierRunner([])
    assert VerifierSpec.parse({"name": "format_digits", "weight": 0.5}) == VerifierSpec("format_digits", 0.5)


def test_score_without_ray_is_a_clear_error(monkeypatch):
    runner = VerifierRunner([VerifierSpec("exact_answer")])
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="ray.init"):
        runner.score(["u"], ["1+1="], ["2"], {"answer": ["2"]})


# ---------------------------------------------------------------- runner on a real local Ray


@pytest.fixture(scope="module")
def ray_local(local_ray):
    """The session's Ray (shutting a Ray down here would pull it from under every later test)."""
    # Start the verifier hosts once; every runner in this process shares them.
    VerifierRunner([VerifierSpec("exact_answer")], timeout_s=60).score(
        ["w"], ["1+1="], ["2"], {"answer": ["2"]}
    )
    return local_ray


ROWS = {  # five rows, so chunk_size=2 makes three chunks including a short last one
    "uids": ["p0/s0/g0", "p0/s0/g1", "p1/s0/g0", "p1/s0/g1", "p2/s0/g0"],
    "prompts": ["123+45=", "123+45=", "9+9=", "9+9=", "5+0="],
    "completions": ["861", "862", "81", "bad", "5 tail"],
    "columns": {"answer": ["861", "861", "81", "81", "5"]},
}


def _score(runner: VerifierRunner):
    return runner.score(ROWS["uids"], ROWS["prompts"], ROWS["completions"], ROWS["columns"])


def test_exact_answer_scores_across_chunks(ray_local):
    start = time.monotonic()
    out = _score(VerifierRunner([VerifierSpec("exact_answer")], chunk_size=2))
    call_seconds = time.monotonic() - start
    assert out.uids == ROWS["uids"]
    assert out.per_verifier == {"exact_answer": [1.0, 0.0, 1.0, 0.0, 1.0]}
    assert out.rewards == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert out.correct == [True, False, True, False, True]
    assert out.failures == {}
    assert 0 < out.verify_seconds <= call_seconds  # the duration of this call, measured inside it
    empty = VerifierRunner([VerifierSpec("exact_answer")]).score([], [], [], {"answer": []})
    assert (empty.rewards, empty.correct, empty.per_verifier) == ([], [], {"exact_answer": []})


def test_weighted_sum_and_first_verifier_decides_correct(ray_local):
    runner = VerifierRunner(
        [VerifierSpec("exact_answer", 2.0), VerifierSpec("format_digits", 0.5)], chunk_size=2
    )
    out = _score(runner)
    assert out.per_verifier["format_digits"] == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert out.rewards == pytest.approx([2.5, 0.5, 2.5, 0.0, 2.5])
    assert out.correct == [
        True,
        False,
        True,
        False,
        True,
    ]  # format_digits=1 on row 1 does not make it correct
    swapped = _score(VerifierRunner([VerifierSpec("format_digits"), VerifierSpec("exact_answer")]))
    assert swapped.correct == [True, True, True, False, True]


def test_async_verifier(ray_local, vfile):
    out = _score(VerifierRunner([VerifierSpec("exact_answer"), VerifierSpec(f"{vfile}:async_length", 0.1)]))
    assert out.per_verifier[f"{vfile}:async_length"] == [30.0, 30.0, 20.0, 30.0, 60.0]
    assert out.rewards == pytest.approx([4.0, 3.0, 3.0, 3.0, 7.0])
    assert out.failures == {}


def test_raising_verifier_is_recorded_and_others_still_score(ray_local, vfile):
    name = f"{vfile}:boom"
    out = _score(VerifierRunner([VerifierSpec("exact_answer"), VerifierSpec(name)], chunk_size=2))
    assert out.per_verifier["exact_answer"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert out.per_verifier[name] == [0.0] * 5
    assert out.rewards == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert set(out.failures) == set(ROWS["uids"])
    assert out.failures["p1/s0/g0"] == f"{name}: RuntimeError: verifier exploded"


def test_wrong_length_fails_the_chunk(ray_local, vfile):
    name = f"{vfile}:short"
    out = _score(VerifierRunner([VerifierSpec("exact_answer"), VerifierSpec(name)], chunk_size=2))
    assert out.per_verifier[name] == [0.0] * 5
    assert out.failures["p0/s0/g0"] == f"{name}: returned 1 scores for 2 rows"
    assert out.failures["p2/s0/g0"] == f"{name}: returned 0 scores for 1 rows"


def test_nan_fails_only_that_row_and_reasons_join(ray_local, vfile):
    nan, boom = f"{vfile}:nan_on_bad", f"{vfile}:boom"
    out = _score(VerifierRunner([VerifierSpec("exact_answer"), VerifierSpec(nan, 3.0)], chunk_size=2))
    assert out.per_verifier[nan] == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert list(out.failures) == ["p1/s0/g1"]
    assert "non-finite" in out.failures["p1/s0/g1"] and out.failures["p1/s0/g1"].startswith(f"{nan}: ")
    assert out.rewards == [4.0, 3.0, 4.0, 0.0, 4.0]
    assert all(math.isfinite(r) for r in out.rewards)
    both = _score(VerifierRunner([VerifierSpec(nan), VerifierSpec(boom)]))
    assert both.failures["p1/s0/g1"].count("; ") == 1
    assert both.correct == [True, True, True, False, True]  # a failed first verifier is never correct


def test_hanging_verifier_times_out_within_deadline(ray_local, vfile):
    from opd.rewards.runner import _POOL

    name = f"{vfile}:hang"
    runner = VerifierRunner([VerifierSpec("exact_answer"), VerifierSpec(name)], timeout_s=3, chunk_size=2)
    hosts = list(_POOL.get(runner.num_workers))  # the hosts this call's chunks go to
    out = _score(runner)
    # The deadline ended the wait, not the hang: waited for, the hang would have scored every row 1.0.
    assert out.per_verifier[name] == [0.0] * 5
    assert all(out.failures[u] == f"{name}: timeout after 3s" for u in ROWS["uids"])
    # The hung chunks held back neither the other verifier's scores nor the correctness it decides.
    assert out.per_verifier["exact_answer"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert out.correct == [True, False, True, False, True]
    # Chunks go round-robin, so both hosts held a hung chunk: each was killed and a fresh host took its place.
    assert set(_POOL.hosts).isdisjoint(hosts) and len(_POOL.hosts) == len(hosts)
    for host in hosts:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(host.ready.remote())
    again = _score(VerifierRunner([VerifierSpec("exact_answer")], timeout_s=3, chunk_size=2))
    assert again.per_verifier["exact_answer"] == [1.0, 0.0, 1.0, 0.0, 1.0] and not again.failures


def test_verifier_that_kills_its_process_fails_its_rows_and_the_pool_recovers(ray_local, vfile):
    name = f"{vfile}:exit_process"
    out = _score(VerifierRunner([VerifierSpec("exact_answer"), VerifierSpec(name)], chunk_size=2))
    assert out.per_verifier[name] == [0.0] * 5
    assert all(name in out.failures[u] for u in ROWS["uids"])
    again = _score(VerifierRunner([VerifierSpec("exact_answer")], chunk_size=2))
    assert again.per_verifier["exact_answer"] == [1.0, 0.0, 1.0, 0.0, 1.0] and not again.failures


def test_evaluation_never_counts_a_failed_verification_as_wrong(ray_local, tmp_path):
    """A verifier that fails once is retried; one that always fails stops the evaluation with a clear
    error."""
    from opd.cluster import Roles
    from opd.rewards import VerifierRunner, VerifierSpec
    from opd.steps import _verify_all
    from opd.types import Prompt

    flaky = tmp_path / "flaky.py"
    marker = tmp_path / "seen"
    flaky.write_text(
        "import pathlib\n"
        f"MARK = pathlib.Path({str(marker)!r})\n"
        "def first_call_fails(prompts, completions, answer, **_):\n"
        "    if not MARK.exists():\n"
        "        MARK.write_text('1')\n"
        "        raise RuntimeError('transient')\n"
        "    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]\n"
        "def always_fails(prompts, completions, **_):\n"
        "    raise RuntimeError('broken')\n"
    )
    prompts = [Prompt(f"p{i}", "t", [1], str(i), {"prompt": f"{i}+0=", "answer": str(i)}) for i in range(3)]
    texts = ["0", "9", "2"]
    roles = Roles([], None, None, VerifierRunner([VerifierSpec(f"{flaky}:first_call_fails")]))
    assert _verify_all(roles, ["a", "b", "c"], prompts, texts) == [True, False, True]
    roles = Roles([], None, None, VerifierRunner([VerifierSpec(f"{flaky}:always_fails")]))
    with pytest.raises(RuntimeError, match="3 of 3 rows could not be verified.*broken"):
        _verify_all(roles, ["a", "b", "c"], prompts, texts)
