"""The ``code_exec`` verifier: runs model-written code against test cases in a sandbox
(``opd.rewards.sandbox``).

Score of a row = the fraction of its tests that pass. The code is the completion's last fenced ```python block
(or the whole completion when it has none). Tests come from a dataset column (``tests`` unless
``tests_column`` says
otherwise), one cell per row, in any of these shapes:

* a list of ``{"input": str, "output": str}``: each case is one sandboxed run with ``input`` on stdin; it
passes when
  stdout equals ``output`` after stripping trailing whitespace (per line and at the end);
* a string of Python ``assert`` statements: appended to the code and run once; each top-level ``assert`` is a
test
  (other statements in it, e.g. imports, are setup and run in order);
* a list mixing both, or a JSON string holding either.

A run that hits a sandbox limit (timeout, CPU, memory, processes, file size, disk, output) scores the whole
row 0.0 and skips its remaining tests: the budget of a row must not grow with the tests of a hostile solution.
A malformed cell gives that row a ``ValueError`` naming it, which the runner records as that row's failure; so
does an interpreter that dies of a crash signal (SIGSEGV, SIGBUS, SIGILL, SIGABRT): no verdict, rather than a
wrong answer.

Before its first row in a process, ``code_exec`` runs a known-correct program in the same sandbox with the
same limits (``self_test``): it imports common standard-library modules (and numpy when this interpreter has
it) and must print the expected answer. If it does not, every call raises ``SandboxError``: a sandbox in which
correct code fails would score every solution 0, a silently wrong reward. ``opd run`` calls each verifier once
before Ray starts, so such a machine fails the job at once with exit code 2.

Config::

    verifiers:
      functions: [{name: code_exec, kwargs: {timeout_s: 5, memory_mb: 256, workers: 4}}]

kwargs: ``tests_column``; ``workers`` (rows run at once, default 4); limits ``timeout_s`` (wall clock per
run),
``cpu_s``, ``memory_mb``, ``file_size_mb``, ``nproc``, ``nofile``, ``max_output_kb``, ``network``, ``view``,
``disk_mb``, ``files`` (see docs/sandbox.md).
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import signal
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib.util import find_spec

from opd.rewards.registry import register

_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT)
_SELF_TEST_MODULES = ("glob", "csv", "pickle", "shutil", "json", "re", "collections", "itertools",
                      "functools", "heapq", "bisect", "math", "fractions", "decimal", "statistics",
                      "datetime", "string", "random", "typing", "dataclasses", "copy", "array", "struct",
                      "hashlib", "io", "os", "sys", "tempfile")
_LIMIT_KWARGS = {"timeout_s": "wall_s", "cpu_s": "cpu_s", "memory_mb": "memory_mb",
                 "file_size_mb": "file_size_mb", "nproc": "nproc", "nofile": "nofile", "network": "network",
                 "view": "view", "disk_mb": "disk_mb", "files": "files"}


@register("code_exec")
def code_exec(prompts: list[str], completions: list[str], *, tests_column: str = "tests", workers: int = 4,
              **kwargs: object) -> list[float | ValueError]:
    """Fraction of each row's tests that its completion's code passes (see the module docstring)."""
    from opd.rewards.sandbox import SandboxLimits  # stdlib only, but only hosts that run code need it

    n = len(completions)
    if tests_column not in kwargs:
        columns = sorted(k for k, v in kwargs.items() if isinstance(v, list | tuple) and len(v) == n)
        raise ValueError(f"code_exec needs a dataset column {tests_column!r} with the test cases "
                         f"(kwarg tests_column); the rows have columns {columns}")
    tests = kwargs.pop(tests_column)
    if len(tests) != n:
        raise ValueError(f"code_exec: column {tests_column!r} has {len(tests)} rows for {n} completions")
    # Dataset columns and config kwargs arrive together: a non-column kwarg we do not know is a config typo.
    options = {k: v for k, v in kwargs.items() if not (isinstance(v, list | tuple) and len(v) == n)}
    unknown = sorted(set(options) - set(_LIMIT_KWARGS) - {"max_output_kb"})
    if unknown:
        raise ValueError(f"code_exec: unknown option(s) {unknown}; valid: "
                         f"{sorted([*_LIMIT_KWARGS, 'max_output_kb', 'tests_column', 'workers'])}")
    overrides = {_LIMIT_KWARGS[k]: v for k, v in options.items() if k in _LIMIT_KWARGS}
    if "max_output_kb" in options:
        overrides["max_output_bytes"] = int(float(options["max_output_kb"]) * 1024)  # type: ignore[arg-type]
    limits = SandboxLimits().replace(**overrides)
    if int(workers) < 1:
        raise ValueError(f"code_exec: workers must be >= 1, got {workers}")
    self_test(limits)

    parsed: list[list | ValueError] = []
    for i, cell in enumerate(tests):
        try:
            parsed.append(parse_tests(cell))
        except ValueError as e:
            parsed.append(ValueError(f"code_exec: row {i}, column {tests_column!r}: {e}"))

    def score(i: int) -> float | Exception:
        cases = parsed[i]
        if isinstance(cases, ValueError):
            return cases
        try:
            return _score_row(extract_code(completions[i]), cases, limits)
        except InterpreterCrash as e:
            return e

    with ThreadPoolExecutor(max_workers=min(int(workers), max(n, 1)), thread_name_prefix="code_exec") as pool:
        return list(pool.map(score, range(n)))


@lru_cache(maxsize=8)
def self_test(limits) -> str:
    """Run a known-correct program under ``limits``; raise ``SandboxError`` unless it passes. Cached per
    process and limits (a pass is returned as the modules it imported)."""
    from opd.rewards.sandbox import SandboxError, run_sandboxed

    modules = [*_SELF_TEST_MODULES, *(["numpy"] if find_spec("numpy") else [])]
    program = f"import {', '.join(modules)}\nprint(sum(int(x) for x in input().split()))\n"
    result = run_sandboxed(program, "19 23\n", limits=limits)
    if not (result.ok and result.stdout.strip() == "42"):
        raise SandboxError(
            f"code_exec self-test: a correct program importing {', '.join(modules)} did not pass in the "
            f"sandbox ({result.reason or 'wrong output ' + repr(result.stdout[:100])}; "
            f"view {result.network}; stderr: "
            f"{result.stderr.strip()[-600:]!r}); correct solutions would score 0 here. docs/sandbox.md says "
            "what the sandbox needs (an interpreter whose standard library its uid can read)")
    return ",".join(modules)


def extract_code(completion: str) -> str:
    """The last fenced ```python block (an unclosed one runs to the end), else the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def parse_tests(cell: object) -> list[dict | str]:
    """A cell as a list of ``{"input", "output"}`` dicts and assert-block strings; ValueError says what is
    wrong."""
    if isinstance(cell, str) and cell.lstrip()[:1] in ("[", "{"):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as e:
            raise ValueError(f"looks like JSON but does not parse: {e}") from e
    items = [cell] if isinstance(cell, str | dict) else cell
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"expected a non-empty list of {{'input', 'output'}} cases or a string of asserts, "
                         f"got {type(cell).__name__}: {str(cell)[:100]!r}")
    out: list[dict | str] = []
    for j, item in enumerate(items):
        if isinstance(item, dict):
            if set(item) != {"input", "output"} or not all(isinstance(v, str) for v in item.values()):
                raise ValueError(
                    f"case {j}: expected {{'input': str, 'output': str}}, got {str(item)[:100]!r}")
            out.append(item)
        elif isinstance(item, str):
            try:
                tree = ast.parse(item)
            except SyntaxError as e:
                raise ValueError(f"case {j}: the asserts do not parse: {e}") from e
            if not any(isinstance(s, ast.Assert) for s in tree.body):
                raise ValueError(f"case {j}: a test string must hold at least one top-level assert")
            out.append(item)
        else:
            raise ValueError(f"case {j}: expected a dict or a string of asserts, got {type(item).__name__}")
    return out


class InterpreterCrash(RuntimeError):
    """The sandboxed interpreter died of a crash signal: the row gets no verdict (a verifier failure)."""


def _check_crash(result) -> None:
    if result.signal in _CRASH_SIGNALS:
        raise InterpreterCrash(f"the sandboxed interpreter died of signal {result.signal} "
                               f"({signal.Signals(result.signal).name}): {result.stderr.strip()[-300:]!r}")


def _score_row(code: str, cases: list[dict | str], limits) -> float:
    from opd.rewards.sandbox import run_sandboxed

    total = passed = 0
    for case in cases:
        if isinstance(case, dict):
            result = run_sandboxed(code, case["input"], limits=limits)
            _check_crash(result)
            total += 1
            passed += result.ok and _same_output(result.stdout, case["output"])
        else:
            body = ast.parse(case).body
            units = [ast.get_source_segment(case, s) or ast.unparse(s) for s in body]
            is_test = [isinstance(s, ast.Assert) for s in body]
            result, verdicts = _run_asserts(code, units, limits)
            _check_crash(result)
            total += sum(is_test)
            passed += sum(ok for ok, t in zip(verdicts, is_test, strict=True) if t)
        if result.limit_hit:
            return 0.0
    return passed / total


def _run_asserts(code: str, units: list[str], limits):
    """Run the code, then each statement of the test string in the code's globals, each under its own try.

    The verdicts come back on the last stdout line behind a per-run random tag, so printing "ok" does not
    pass; code that reads its own file can still find the tag: asserts run in-process are not proof against a
    solution that attacks its harness (input/output cases compare what the code printed instead).
    """
    from opd.rewards.sandbox import run_sandboxed

    tag = secrets.token_hex(16)
    harness = (
        f"\n\ndef _opd_run_tests(_units={units!r}, _tag={tag!r}):\n"
        "    _ok = []\n"
        "    for _u in _units:\n"
        "        try:\n"
        "            exec(compile(_u, '<test>', 'exec'), globals())\n"
        "            _ok.append('1')\n"
        "        except BaseException:\n"
        "            _ok.append('0')\n"
        "    print('\\n' + _tag + ''.join(_ok), flush=True)\n"
        "_opd_run_tests()\n"
    )
    result = run_sandboxed(code + harness, "", limits=limits)
    last = result.stdout.rstrip("\n").rsplit("\n", 1)[-1] if result.ok else ""
    bits = (last[len(tag):] if last.startswith(tag) and len(last) == len(tag) + len(units)
            else "0" * len(units))
    return result, [b == "1" for b in bits]


def _same_output(got: str, want: str) -> bool:
    return ([line.rstrip() for line in got.rstrip().splitlines()]
            == [line.rstrip() for line in want.rstrip().splitlines()])
