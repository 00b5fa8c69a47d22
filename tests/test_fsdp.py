"""FSDP2 learner ranks (trainer.strategy: fsdp2) on the CPU: two gloo ranks each holding half of every weight
end where one unsharded learner ends, for every objective family, for LoRA and under gradient checkpointing; a
sharded checkpoint resumes bit for bit on the ranks and, unsharded, on one learner. The ranks run in processes
of their own (tests/fsdp_ranks.py); the job-level path (Ray actors, weight export to the engines, the probe)
is in tests/test_learner_ranks.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fsdp_ranks import CASES, SIZES
from servers import clean_env, start, stop_group, tail

from opd.trainer.fsdp import pad_micro

STATS = ("loss", "grad_norm", "entropy", "train_tokens", "update_skipped")


@pytest.fixture(scope="module")
def ranked(tiny_models, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    log = out / "fsdp_ranks.log"
    proc = start([sys.executable, str(Path(__file__).with_name("fsdp_ranks.py")), str(tiny_models), str(out)],
                 log, clean_env())
    try:
        proc.wait(timeout=300)  # ~20 s; ranks whose collectives mismatch hang instead of failing
    finally:
        stop_group(proc)
    path = out / "result.json"
    assert path.is_file(), f"tests/fsdp_ranks.py exited {proc.returncode}:\n{tail(log)}"
    return json.loads(path.read_text())


def test_pad_micro_repeats_the_last_micro_batch():
    assert pad_micro([[0, 1], [2]], 4) == ([[0, 1], [2], [2], [2]], 2)
    assert pad_micro([[0]], 1) == ([[0]], 0)


@pytest.mark.parametrize("name", list(CASES))
def test_two_sharded_ranks_match_one_unsharded_learner(ranked, name):
    r = ranked[name]
    # Every parameter is a shard, and each rank holds half of the elements (the tiny model's sizes are all
    # even).
    assert r["sharded"] > 0 and r["local_numel"] * 2 == r["numel"]
    assert len(r["steps"]) == len(SIZES)
    for step, (two, one) in enumerate(zip(r["steps"], r["single_steps"], strict=True)):
        for key in STATS:
            # The ranks' statistics are the whole batch's: a rank dividing by its own shard's tokens,
            # averaging the gradient instead of summing it, or counting the empty shard's stand-in sample
            # shows here (the weights alone would hide a gradient scale: Adam divides it out).
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (
                f"{name} step {step} {key}: {two[key]} vs {one[key]}")
    # Three AdamW steps at lr 1e-3 (9 and 8 samples in micro-batches of 2, the ranks' plans 3 and 2 long; then
    # one sample, rank 1 a stand-in). The runs sum the same terms in another order, so the gradients agree to
    # float32 rounding, which Adam's 1/sqrt(v) magnifies where a gradient nearly cancels: measured 1.5e-7
    # (LoRA) to 5.6e-6.
    assert r["max_abs_diff"] <= 1e-5, (
        f"{name}: the sharded weights differ from the unsharded by {r['max_abs_diff']:.2e}")


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_checkpoint_resumes_exactly_and_loads_unsharded(ranked, name):
    r = ranked[name]
    assert r["resume_bit_identical"], (
        f"{name}: the step after loading the checkpoint differs from the step before saving")
    # One unsharded learner loads the ranks' checkpoint (model/ or adapter/, optimizer by name) and takes the
    # same step: measured 7e-9 to 3.8e-7 (rounding, as above).
    assert r["cross_resume_max_abs_diff"] <= 1e-5, f"{name}: {r['cross_resume_max_abs_diff']:.2e}"
