"""Learner ranks across nodes: token-balanced shards (unit), and on a simulated two-node Ray cluster a 2-rank
learner that ends where a 1-rank learner ends, skips a poisoned step on every rank, restores every rank from
rank 0's load, and runs a whole job.

The multi-node part runs in a process of its own (tests/multinode.py): a ``ray.cluster_utils.Cluster`` needs
its own
``ray.init``, and this session's local Ray must stay as other test files left it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from servers import clean_env, start, stop_group, tail

from opd.trainer.shards import balance_shards, shard_imbalance, take
from opd.types import TrainBatch


def test_balance_shards_exact_assignments():
    # Longest first onto the least-loaded shard: 7->A, 5->B, 4->B, 3->A, 3->B, 2->A; loads 12 / 12.
    lengths = [7, 5, 4, 3, 3, 2]
    assert balance_shards(lengths, 2) == [[0, 3, 5], [1, 2, 4]]
    assert shard_imbalance(lengths, balance_shards(lengths, 2)) == 1.0
    # The three short ones fill the gaps the long ones left; ties go to the lower shard index.
    assert balance_shards([10, 9, 8, 1, 1, 1], 3) == [[0], [1, 4], [2, 3, 5]]
    # equal lengths: lower index first, round robin
    assert balance_shards([2, 2, 2, 2], 2) == [[0, 2], [1, 3]]
    assert balance_shards([4, 1], 1) == [[0, 1]] and shard_imbalance([4, 1], [[0, 1]]) == 1.0
    # More ranks than samples: the spare ranks get empty shards (they still join the collectives).
    assert (balance_shards([5], 3) == [[0], [], []]
            and shard_imbalance([5], [[0], [], []]) == pytest.approx(3.0))
    with pytest.raises(ValueError, match="num_shards"):
        balance_shards([1], 0)


@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_demo_shaped_batch_balances_within_ten_percent(num_shards):
    # The demo's shape: 256 sequences (64 prompts x 4), chat prompts of ~10-14 tokens, answers of 1-6 tokens.
    rng = random.Random(0)
    lengths = [rng.randint(10, 14) + rng.randint(1, 6) for _ in range(256)]
    shards = balance_shards(lengths, num_shards)
    assert sorted(i for s in shards for i in s) == list(range(256))  # every sample exactly once
    assert shard_imbalance(lengths, shards) <= 1.1  # measured: 1.00025 at 2, 4 and 8 shards
    # Splitting by sequence count instead (contiguous blocks of 256/N) is worse: 1.005 / 1.023 / 1.033 here.
    size = 256 // num_shards
    blocks = [list(range(s, s + size)) for s in range(0, 256, size)]
    assert shard_imbalance(lengths, blocks) > shard_imbalance(lengths, shards)


def test_take_cuts_every_per_sample_field():
    batch = TrainBatch(
        uids=["a", "b", "c"], prompt_ids=[[1], [2, 2], [3]], response_ids=[[4], [5, 5], [6]],
        sampler_logprobs=[[-1.0], [-2.0, -2.0], [-3.0]], advantages=[[0.1], [0.2, 0.2], [0.3]],
        teacher_logprobs=[[-1.5], [-2.5, -2.5], [-3.5]], objective="srpo", loss_weights=[1.0, 0.5, 2.0],
        teacher_prompt_ids=[None, [9], None], routes=["grpo", "sdpo", "grpo"],
    )
    part = take(batch, [2, 1])
    part.validate()
    assert part.uids == ["c", "b"] and part.response_ids == [[6], [5, 5]] and part.loss_weights == [2.0, 0.5]
    assert (part.teacher_prompt_ids == [None, [9]] and part.routes == ["grpo", "sdpo"]
            and part.objective == "srpo")
    assert part.teacher_topk_ids is None


@pytest.fixture(scope="module")
def two_nodes(tiny_models, tmp_path_factory):
    """Run tests/multinode.py once (cluster start-up is the slow part) in its own process group; its
    results."""
    out = tmp_path_factory.mktemp("two_nodes")
    log = out / "multinode.log"
    script = Path(__file__).with_name("multinode.py")
    proc = start([sys.executable, str(script), str(tiny_models), str(out), "equivalence", "job"], log,
                 clean_env())
    try:
        proc.wait(timeout=900)
    finally:
        stop_group(proc)  # whatever the Cluster's shutdown left (raylets, workers) goes with the group
    return out, proc.returncode, log


def _result(two_nodes, part: str) -> dict:
    out, code, log = two_nodes
    path = out / f"{part}.json"
    assert path.is_file(), f"tests/multinode.py exited {code} before writing {part}.json:\n{tail(log)}"
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["opd", "grpo", "srpo", "opd-ddp"])
def test_two_ranks_on_two_nodes_match_one_rank(two_nodes, algorithm):
    """Sharded (FSDP2, the default) for every family, and as replicas (ddp) once; rank 0's exported weights
    are the engines' and must equal one unsharded learner's."""
    r = _result(two_nodes, "equivalence")[algorithm]
    assert r["strategy"] == ("ddp" if algorithm.endswith("-ddp") else "fsdp2")
    assert len(r["nodes"]) == 2, "STRICT_SPREAD should have put the two ranks on different nodes"
    assert r["ranks_identical"], "the ranks' weights drifted apart: their updates differ"
    assert r["versions"] == [2, 2, 2]
    for step in r["steps"]:
        assert step["update_skipped"] == [0.0, 0.0]
        assert (step["train_tokens"][0] == step["train_tokens"][1]
                and step["loss_tokens"][0] == step["loss_tokens"][1])
        # Loss and pre-clip gradient norm carry the scale of the batch-wide denominators (Adam's update nearly
        # hides a scale error in the weights): a rank dividing by its own shard's tokens would be off by ~2x
        # here.
        for key in ("loss", "grad_norm", "entropy"):
            one, two = step[key]
            assert two == pytest.approx(one, rel=1e-5, abs=1e-7), f"{algorithm} {key}"
        assert 1.0 <= step["shard_token_imbalance"][1] <= 1.1 and step["shard_token_imbalance"][0] == 1.0
    # Weights after two AdamW steps at lr 1e-3. Tolerance 1e-5 absolute = 1% of one step's move. The two runs
    # sum the same per-token terms in a different order (two shards, then an all-reduce) so gradients agree to
    # float32 rounding (~1e-7 relative); Adam then divides by sqrt(v), which magnifies that rounding for the
    # few elements whose gradient nearly cancels. Observed: max |dw| 3e-7 (OPD), 5e-7 (GRPO), 1.6e-6 (SRPO).
    assert r["max_abs_diff"] <= 1e-5, (
        f"{algorithm}: 2-rank weights differ from 1-rank by {r['max_abs_diff']:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("run", ["opd", "opd-ddp"])
def test_non_finite_loss_on_one_rank_skips_every_rank_and_load_restores_every_rank(two_nodes, run):
    r = _result(two_nodes, "equivalence")[run]
    # replicas export their own weights; shards export rank 0's gather
    exports = 2 if run.endswith("-ddp") else 1
    assert r["nan_skipped"] == 1.0 and r["nan_unchanged"] == [True] * exports
    assert r["load_restored"] == [True] * exports and r["loaded_versions"] == [3, 3]


@pytest.mark.slow
def test_two_rank_job_on_two_nodes_logs_shard_imbalance(two_nodes):
    r = _result(two_nodes, "job")
    assert r["summary"]["steps"] == 2 and r["summary"]["weight_version"] == 2
    rows = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    for row in rows:
        assert 1.0 <= row["shard_token_imbalance"] <= 1.5  # 8 short sequences over 2 ranks
        assert row["update_skipped"] == 0.0 and row["probe_max_diff"] < 1e-3  # engines serve rank 0's weights
