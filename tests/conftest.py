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
    out = Path(cache) / "tiny" if cache else tmp_path_factory.mktemp("models")
    bootstrap(out, tiny_spec())
    return out


# the first and last of 30: a 35M-parameter student that still loads and trains like any
SMOLLM2_STUDENT_LAYERS = "0,29"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    """The real pair: (teacher, student) checkpoint directories of SmolLM2-135M-Instruct and a student pruned
    from it, built with ``opd bootstrap --model`` and ``opd prune``."""
    from opd.cli import main as opd_main

    cache = os.environ.get("OPD_TEST_MODELS")  # reuse across local sessions; CI builds them fresh
    root = Path(cache) / "real" if cache else tmp_path_factory.mktemp("real")
    teacher, student = root / "smollm2", root / "smollm2-L2"
    assert opd_main(["bootstrap", "--model", "smollm2", "--out", str(teacher)]) == 0
    assert opd_main(["prune", str(teacher), "--keep-layers", SMOLLM2_STUDENT_LAYERS,
                     "--out", str(student)]) == 0
    return teacher, student


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from opd.rollout.engine import ACTOR_ENV

    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": ACTOR_ENV},
             log_to_driver=False)
    yield ray
    ray.shutdown()


# Two rollout workers, generation one step ahead, every sample logged: the uninterrupted run that a killed
# worker's run (tests/test_faults.py) and a chunked stream's (tests/test_stream.py) must each reproduce
TWO_WORKERS = {"trainer.total_steps": 4, "rollout.num_workers": 2, "rollout.max_staleness": 1,
               "run.log_samples": "true", "checkpoint.every": 0}


@pytest.fixture(scope="session")
def two_workers_run(tiny_models, local_ray, tmp_path_factory) -> Path:
    from opd.config import load_config
    from opd.driver import run

    out = tmp_path_factory.mktemp("two_workers") / "uninterrupted"
    run(load_config(None, tiny_overrides(tiny_models, out, **TWO_WORKERS)), progress=False)
    return out


@pytest.fixture(scope="session")
def opd_run(tiny_models, local_ray, tmp_path_factory) -> tuple[Path, dict]:
    """The 2-step OPD job of ``tiny_overrides``, disaggregated: (run directory, summary). Its checks:
    tests/test_pipeline.py; the colocated run must equal it (tests/test_colocate.py)."""
    from opd.config import load_config
    from opd.driver import run

    out = tmp_path_factory.mktemp("runs") / "opd2"
    summary = run(load_config(None, tiny_overrides(tiny_models, out)), progress=False)
    return out, summary


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


def answered_right(model_dir, prompts: list, max_tokens: int) -> list[bool]:
    """Whether ``model_dir`` answers each prompt right, greedily on the HF engine (whose greedy tokens are
    vLLM's: tests/test_hf_engine.py) and judged by exact_answer, the default first verifier: a job's held-out
    accuracy recomputed apart from the job, so a test can check the job evaluated the right model on the right
    prompts."""
    from opd.rollout.hf_engine import HFEngine
    from opd.tasks.arithmetic import exact_answer

    outs = HFEngine(str(model_dir), max_model_len=None).generate(
        [p.token_ids for p in prompts], n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    scores = exact_answer([p.columns["prompt"] for p in prompts], [gens[0].text for gens in outs],
                          answer=[p.answer for p in prompts])
    return [s == 1.0 for s in scores]


def start_shared(cfg):
    """A job's rollout workers, teacher and verifier hosts, started once for several jobs of a module (engine
    start-up is most of a short job's time on 2 cores). Call ``train_on`` with each job's config; kill with
    ``stop_shared``."""
    import ray

    from opd.cluster import start_roles

    roles = start_roles(cfg)
    ray.kill(roles.learner)
    return roles


def stop_shared(roles) -> None:
    import ray

    for actor in [*roles.rollout, *(roles.teacher.actors.values() if roles.teacher else ())]:
        ray.kill(actor)


def train_on(shared, cfg, *, rollout=None, teacher=None, verifiers=None, resume: bool = False) -> dict:
    """``opd run``'s job on engines that are already running: its own learner, the shared rollout workers and
    teacher (or those given), the shared verifier hosts. Each job pushes its learner's weights to the workers
    at its start, as every job does, so what an earlier job trained never leaks into the next one."""
    import ray

    from opd.cluster import Roles, connect_learners, start_learners
    from opd.driver import prepare, train

    job = prepare(cfg, resume=resume)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    learners = start_learners(cfg)
    connect_learners(learners, cfg.trainer.dist_backend, cfg.trainer.strategy)
    roles = Roles(rollout or shared.rollout, (teacher or shared.teacher) if cfg.needs_teacher else None,
                  learners.ranks[0], verifiers or shared.verifiers, learners)
    try:
        return train(cfg, job, roles, progress=False)
    finally:
        for rank in learners.ranks:
            ray.kill(rank)
