"""The soak benchmark's short run: a job under injected faults (rollout worker and driver SIGKILLed, a
verifier that raises, hangs, returns NaN or a short list, or exits) trains every scheduled sample exactly once
and survives each fault. Plus the plain checks its verdict rests on: the sample bookkeeping and the verifier
plug-in's faults."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import soak  # noqa: E402
import soak_faults  # noqa: E402


def test_count_samples_finds_lost_duplicated_and_unexpected_ids():
    expected = ["p0/e0/g0", "p0/e0/g1", "p1/e0/g0", "p1/e0/g1"]
    rows = [{"uid": "p0/e0/g0", "trained": True}, {"uid": "p0/e0/g0", "trained": True},
            {"uid": "p0/e0/g1", "trained": False}, {"uid": "p1/e0/g0", "trained": True},
            {"uid": "p9/e0/g0", "trained": True}]
    got = soak.count_samples(expected, rows)
    assert got == {"samples_expected": 4, "samples_lost": 2, "samples_duplicated": 1, "samples_unexpected": 1}
    clean = [{"uid": u, "trained": True} for u in expected]
    assert soak.count_samples(expected, clean)["samples_lost"] == 0


def _faulted_call(kind: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """Rows on which ``plan_fault`` (rate 0.5) picks ``kind``: the fault plan is a pure function of seed and
    rows."""
    for i in range(10_000):
        prompts, completions = [f"{i}+1=", f"{i}+2="], [str(i), "x"]
        if soak_faults.plan_fault(seed, 0.5, prompts, completions)[0] == kind:
            return prompts, completions
    raise AssertionError(f"no call draws {kind}")


def test_flaky_verifier_faults_are_seeded_logged_and_spare_heldout_prompts(tmp_path):
    log, heldout = tmp_path / "faults.jsonl", tmp_path / "heldout.json"
    kw = {"seed": 0, "rate": 0.5, "log_path": str(log), "skip_prompts_path": str(heldout)}
    raise_rows = _faulted_call("raise")
    heldout.write_text(json.dumps([raise_rows[0][0]]))
    assert soak_faults.flaky_verifier(*raise_rows, **kw) == [1.0, 1.0]  # a held-out prompt: no fault
    heldout.write_text("[]")
    with pytest.raises(RuntimeError, match="soak: injected failure"):
        soak_faults.flaky_verifier(*raise_rows, **kw)
    assert len(soak_faults.flaky_verifier(*_faulted_call("short"), **kw)) == 1
    nan = soak_faults.flaky_verifier(*_faulted_call("nan"), **kw)
    assert any(math.isnan(x) for x in nan)
    entries = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["raise", "short", "nan"]
    assert entries[0]["rows"] == [list(r) for r in zip(*raise_rows, strict=True)]
    assert soak_faults.plan_fault(0, 0.5, *raise_rows) == soak_faults.plan_fault(0, 0.5, *raise_rows)


def test_flaky_tools_give_each_fault_as_an_observation_and_the_episode_goes_on(tmp_path):
    """Each tool fault of the agent soak, through the real tool path (thread timeout, the python tool's
    sandbox): an observation saying what went wrong, counted as an error or a timeout, never an exception;
    held-out prompts are never faulted."""
    (tmp_path / "heldout.json").write_text(json.dumps(["1+1="]))
    seen = {}
    for i in range(200):
        env = soak_faults.FlakyTools(seed=0, rate=1.0, timeout_s=0.5, log_path=str(tmp_path / "log.jsonl"),
                                     skip_prompts_path=str(tmp_path / "heldout.json"))
        env.reset({"prompt": f"{i}+7="}, 0)
        kind = soak_faults.TOOL_KINDS[soak_faults.plan_fault(0, 1.0, [f"{i}+7="], ["1"])[1] % 4]
        if kind in seen:
            continue
        step = env.step("12")
        seen[kind] = step
        text = step.observations[0]["content"]
        # a megabyte is the runner's to cut, in tokens (test_episodes); the rest say what went wrong
        said = len(text) == 1_000_000 if kind == "huge" else soak_faults.TOOL_OBSERVATION[kind] in text
        assert said and not step.done, (kind, text[:200])
        assert (step.tool_errors, step.tool_timeouts) == {"raise": (1, 0), "hang": (0, 1), "crash": (1, 0),
                                                          "huge": (0, 0)}[kind]
        assert env.step("34").stop == "answered"  # the second turn ends it
        if len(seen) == len(soak_faults.TOOL_KINDS):
            break
    assert sorted(seen) == sorted(soak_faults.TOOL_KINDS)
    logged = [json.loads(ln)["kind"] for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == sorted(f"tool_{k}" for k in soak_faults.TOOL_KINDS)
    env = soak_faults.FlakyTools(seed=0, rate=1.0, skip_prompts_path=str(tmp_path / "heldout.json"))
    env.reset({"prompt": "1+1="}, 0)
    assert env.step("2").observations == [{"role": "user", "content": "1"}]


@pytest.mark.slow
def test_quick_soak_trains_every_sample_once_and_survives_every_fault(tiny_models, tmp_path):
    """The agent soak (a superset of the plain one: the same process, verifier faults, and a tool that
    misbehaves in two-turn episodes)."""
    out = tmp_path / "out"
    rc = soak.main(["--quick", "--agent", "--models", str(tiny_models), "--work", str(tmp_path / "work"),
                    "--out", str(out), "task.max_digits_a=2"])
    result = json.loads((out / "soak_agent.json").read_text())
    assert (result["samples_lost"] == 0 and result["samples_duplicated"] == 0
            and result["samples_unexpected"] == 0)
    assert result["steps"] == result["steps_planned"]
    assert result["faults"]["driver_sigkill"] == {"injected": 1, "survived": 1}
    assert result["faults"]["rollout_worker_kill"]["injected"] >= 1
    assert any(k.startswith("verifier_") for k in result["faults"])
    assert any(k.startswith("tool_") for k in result["faults"])
    assert result["faults_survived"] == result["faults_injected"], result["faults"]
    assert rc == 0
