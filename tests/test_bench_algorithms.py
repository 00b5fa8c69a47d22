"""benchmarks/algorithms.py's runs are valid jobs: every objective on every pair loads as a config with the
shared budget (one that the config refuses would only show up an hour into a sweep)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("algorithms_bench", ROOT / "benchmarks" / "algorithms.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


BENCH = _bench()


@pytest.mark.parametrize("pair", list(BENCH.PAIRS))
@pytest.mark.parametrize("name", list(BENCH.OBJECTIVES))
def test_every_objective_is_a_valid_job_on_every_pair(pair, name, tmp_path):
    p = BENCH.PAIRS[pair]
    args = argparse.Namespace(out=tmp_path, lr=None, steps=p.steps, eval_every=p.eval_every,
                              eval_prompts=p.eval_prompts)
    for seed in range(2):
        cfg = BENCH.config_of(p, name, seed, args)
        assert cfg.rollout.group_size == p.budget["rollout.group_size"]
        assert cfg.trainer.lr == BENCH.lr_of(p, name)
        assert cfg.algorithm == BENCH.OBJECTIVES[name][0]["algorithm"]
        if p.students[0] is not None:  # each seed its own student and row set
            assert cfg.models.student == p.students[seed % len(p.students)] and cfg.task.seed == seed
