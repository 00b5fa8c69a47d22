"""``cluster.colocate``: the rollout engine inside the learner's process. What it changes (one actor less,
weights copied in place) and what it must not (the samples, the updates, resume): the same job run both ways
must be the same job, bit for bit on CPU."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.config import ConfigError, load_config
from opd.driver import run

pytestmark = pytest.mark.slow

COLOCATE = {"cluster.colocate": "true"}
GRPO = {"algorithm": "grpo", "verifiers.functions": "[{name: format_digits}]"}  # a reward spread: it trains
# dropout draws from the learner's RNG stream, which the colocated engine's start must leave as it was
LORA = {"lora.r": 4, "lora.dropout": 0.1, "trainer.lr": 1e-2}


def _rows(run_dir) -> list[dict]:
    """metrics.jsonl without what measures time: every other figure of a step must be equal."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(("_seconds", "_per_s"))} for r in rows]


def _final(run_dir) -> dict[str, torch.Tensor]:
    step = run_dir / "checkpoints" / "step_000002"
    if (step / "adapter").is_dir():
        return load_file(str(step / "adapter" / "adapter_model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(step / "model", dtype=torch.float32).state_dict()


def _same_job(a, b) -> None:
    assert _rows(b) == _rows(a)
    wa, wb = _final(a), _final(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"the colocated run's weights differ from the disaggregated at {k}"
    summary = lambda d: {k: v for k, v in json.loads((d / "summary.json").read_text()).items()  # noqa: E731
                         if k != "wall_seconds"}
    assert summary(b) == summary(a)


@pytest.fixture
def live_actors(monkeypatch) -> dict[str, set[str]]:
    """The live actors of each run (by run name, their role names), read as its first step is routed."""
    import opd.driver

    seen: dict[str, set[str]] = {}
    route = opd.driver.route

    def looking(*args, **kwargs):
        for name in ray.util.list_named_actors():
            run_name, role = name.split("/", 1)
            seen.setdefault(run_name, set()).add(role)
        return route(*args, **kwargs)

    monkeypatch.setattr(opd.driver, "route", looking)
    return seen


def test_colocated_grpo_matches_the_disaggregated_run_with_one_actor_less(tiny_models, local_ray, tmp_path,
                                                                          live_actors):
    apart, together = tmp_path / "grpo", tmp_path / "grpo_colocated"
    run(load_config(None, tiny_overrides(tiny_models, apart, **GRPO)), progress=False)
    run(load_config(None, tiny_overrides(tiny_models, together, **GRPO, **COLOCATE)), progress=False)
    _same_job(apart, together)
    assert json.loads((apart / "summary.json").read_text())["weight_version"] >= 1  # the student moved
    assert live_actors[apart.name] == {"rollout-0", "learner-0"}
    assert live_actors[together.name] == {"learner-0"}  # GRPO has no teacher: the learner is the only actor


def test_colocated_lora_student_matches_the_disaggregated_run(tiny_models, local_ray, tmp_path):
    apart, together = tmp_path / "lora", tmp_path / "lora_colocated"
    run(load_config(None, tiny_overrides(tiny_models, apart, **LORA)), progress=False)
    run(load_config(None, tiny_overrides(tiny_models, together, **LORA, **COLOCATE)), progress=False)
    _same_job(apart, together)
    assert all(r["probe_max_diff"] < 1e-3 for r in _rows(together))


def test_a_killed_colocated_learner_resumes_with_its_engine_to_the_disaggregated_result(
        opd_run, tiny_models, local_ray, tmp_path, monkeypatch):
    """OPD, colocated: the learner (and with it the engine) is killed in the second step; the run fails, and
    resumed from its step-1 checkpoint it starts both again and ends where the disaggregated run ends, every
    step's figures and the weights the same."""
    import opd.driver

    apart, _ = opd_run
    out = tmp_path / "opd_colocated"
    steps, route = [], opd.driver.route

    def kill_in_step_two(*args, **kwargs):
        steps.append(sorted(n for n in ray.util.list_named_actors() if n.startswith(f"{out.name}/")))
        if len(steps) == 2:
            ray.kill(ray.get_actor(f"{out.name}/learner-0"))
        return route(*args, **kwargs)

    monkeypatch.setattr(opd.driver, "route", kill_in_step_two)
    with pytest.raises(ray.exceptions.RayActorError):
        run(load_config(None, tiny_overrides(tiny_models, out, **COLOCATE)), progress=False)
    monkeypatch.undo()
    assert [r["step"] for r in _rows(out)] == [0]
    assert steps[0] == [f"{out.name}/learner-0", f"{out.name}/teacher-default"]  # and no rollout-0
    # a fresh name: the killed actor's may not be released yet
    again = tiny_overrides(tiny_models, out, **COLOCATE, **{"run.name": "opd_colocated_resumed"})
    run(load_config(None, again), resume=True, progress=False)
    _same_job(apart, out)


@pytest.mark.parametrize("key", ["rollout.num_workers", "trainer.num_ranks"])
def test_colocate_with_several_engines_or_ranks_is_refused(tiny_models, tmp_path, key):
    with pytest.raises(ConfigError, match=rf"cluster\.colocate.*{key}=1 \(got 2\)"):
        load_config(None, tiny_overrides(tiny_models, tmp_path / "x", **COLOCATE, **{key: 2}))
