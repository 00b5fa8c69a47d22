"""Shared fixtures: tiny locally-built checkpoints and one local Ray for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A tiny teacher and student built by the real bootstrap path (same code as `opd bootstrap`)."""
    from opd.tasks.bootstrap import bootstrap, tiny_spec

    cache = os.environ.get("OPD_TEST_MODELS")  # reuse across local sessions; CI builds them fresh
    out = Path(cache) if cache else tmp_path_factory.mktemp("models")
    bootstrap(out, tiny_spec())
    return out


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from opd.cluster import ACTOR_ENV

    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": ACTOR_ENV}, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_overrides(models: Path, out: Path, **extra) -> list[str]:
    """A 2-step job on the tiny models: every role runs for real, at the smallest useful size."""
    base = {
        "run.name": out.name,
        "run.output_dir": str(out),
        "models.student": str(models / "student"),
        "models.teacher": str(models / "teacher"),
        "task.num_train": 200,
        "task.num_test": 20,
        "task.max_digits_a": 2,
        "task.max_digits_b": 2,
        "eval.num_prompts": 20,
        "rollout.prompts_per_step": 4,
        "rollout.group_size": 2,
        "rollout.max_new_tokens": 4,
        "rollout.max_model_len": 32,
        "eval.max_new_tokens": 4,
        "trainer.total_steps": 2,
        "trainer.micro_batch_size": 3,
        "checkpoint.every": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]
