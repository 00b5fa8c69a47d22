"""Several teachers in one job: a dataset column picks each sample's teacher (real engines on local Ray)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import answered_right, tiny_overrides

from opd.cluster import start_roles, stop_roles
from opd.config import ConfigError, load_config
from opd.data import PromptSource
from opd.driver import prepare, train
from opd.rollout.stream import score_whole
from opd.steps import ChunkScorer, sample
from opd.teacher.multi import DEFAULT, teacher_name

pytestmark = pytest.mark.slow


def _rows(n: int, teachers: list[str | None]) -> list[dict]:
    return [{"prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)[::-1],
             "teacher": teachers[i % len(teachers)]} for i in range(n)]


def _config(tmp_path, tiny_models, rows_train, rows_test):
    for name, rows in (("train", rows_train), ("test", rows_test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "job.yaml"
    # The "self" teacher is the student's own starting checkpoint: its log-prob of every token the student
    # drew at step 0 must equal the sampler's, which tells which teacher scored which sample.
    path.write_text(yaml.safe_dump({"models": {"teachers": {"self": str(tiny_models / "student")}},
                                    "teacher": {"column": "teacher", "top_k": 3}}))
    overrides = tiny_overrides(tiny_models, tmp_path / "run", **{
        "task.name": "files", "task.train_path": str(tmp_path / "train.jsonl"),
        "task.test_path": str(tmp_path / "test.jsonl"), "opd.divergence": "teacher_topk",
        "eval.num_prompts": len(rows_test),
    })
    return load_config(path, overrides)


def test_rows_are_scored_by_the_teacher_they_name(tiny_models, local_ray, tmp_path):
    cfg = _config(tmp_path, tiny_models, _rows(40, ["self", None, ""]), _rows(10, ["self", None]))
    job = prepare(cfg)
    roles = start_roles(cfg)
    try:
        draws = PromptSource(job.train, seed=0).next_batch(6)
        rollouts = sample(roles, draws, 0, cfg)
        scores = score_whole(ChunkScorer(roles, cfg), rollouts).scores
        assert scores.uids == [s.uid for s in rollouts.samples]
        for s, lp, ids in zip(rollouts.samples, scores.logprobs, scores.topk_ids, strict=True):
            gap = max(abs(a - b) for a, b in zip(s.sampler_logprobs, lp, strict=True))
            assert len(ids) == len(s.response_ids) and len(ids[0]) == 3
            if s.prompt.columns["teacher"] == "self":
                assert gap < 1e-4, f"{s.uid} should be scored by the student's own checkpoint"
            else:
                assert gap > 1e-2, f"{s.uid} should be scored by the default teacher"
        summary = train(cfg, job, roles, progress=False)  # the whole loop, teacher accuracy per row's teacher
        assert summary["steps"] == 2
        # Each held-out row is answered by the teacher it names: recomputed here, row by row, on the HF
        # engine.
        right = {name: answered_right(tiny_models / d, job.test, cfg.eval.max_new_tokens)
                 for name, d in (("self", "student"), (DEFAULT, "teacher"))}
        by_own = [right[teacher_name(p, "teacher")][i] for i, p in enumerate(job.test)]
        assert summary["teacher_accuracy"] == sum(by_own) / len(by_own)
    finally:
        stop_roles(roles)


def test_a_row_naming_an_undefined_teacher_is_refused(tiny_models, tmp_path):
    cfg = _config(tmp_path, tiny_models, _rows(10, [None, "nobody"]), _rows(4, [None]))
    with pytest.raises(ConfigError,
                       match=r"teacher.column='teacher': 5 rows name a teacher .* names 'nobody'"):
        prepare(cfg)
    assert not (tmp_path / "run").exists()


def test_teacher_call_puts_each_teachers_part_back_in_batch_order(local_ray):
    """``Teachers.submit``'s hand-off: ``result()`` is the batch's ``TeacherScores``, rows in batch order
    whichever teacher scored them (parts stand in as ObjectRefs of the actors' answers)."""
    import numpy as np
    import ray

    from opd.teacher.multi import TeacherCall
    from opd.types import Prompt, Sample, TeacherScores

    samples = [Sample(f"p{i}/e0/g0", Prompt(f"p{i}", "", [1], ""), 0, [7] * (i + 1), "", [-1.0] * (i + 1), 0)
               for i in range(4)]

    def part(idx):
        rows = [samples[i] for i in idx]
        return ray.put(TeacherScores([s.uid for s in rows], [[-float(i)] * (i + 1) for i in idx],
                                     [[[i]] * (i + 1) for i in idx], [[[-float(i)]] * (i + 1) for i in idx],
                                     1.0,
                                     [np.full((i + 1, 2), i, np.float32) for i in idx]))

    call = TeacherCall(samples, {"a": ([0, 2], part([0, 2])), "b": ([1, 3], part([1, 3]))})
    got = call.result()
    assert got.uids == [s.uid for s in samples]
    assert got.logprobs == [[-float(i)] * (i + 1) for i in range(4)]
    assert got.topk_ids == [[[i]] * (i + 1) for i in range(4)]
    assert [h[0, 0] for h in got.hidden] == [0, 1, 2, 3]
    whole = TeacherCall.whole(samples, part([0, 1, 2, 3])).result()  # one part: the actor's answer as is
    assert whole.score_seconds == 1.0 and whole.logprobs == got.logprobs
