"""The teacher signal is decided once (``opd.signal``) and every role reads that decision."""

from __future__ import annotations

import pytest

from opd.config import load_config
from opd.plan import objective_spec, route_plan
from opd.signal import TeacherSignal, teacher_signal
from opd.trainer.objectives import get

CASES = [
    # algorithm, opd.divergence, opd.full_vocab_source -> kind, source, top_k, hidden
    ("opd", "sampled", "learner", TeacherSignal("sampled", "teacher")),
    ("opd", "teacher_topk", "learner", TeacherSignal("topk", "teacher", top_k=20)),
    ("opd", "full_vocab", "learner", TeacherSignal("full_vocab", "learner")),
    ("opd", "full_vocab", "teacher", TeacherSignal("full_vocab", "teacher", hidden=True)),
    # ExOPD reads only sampled log-probs
    ("exopd", "teacher_topk", "learner", TeacherSignal("sampled", "teacher")),
    ("grpo", "teacher_topk", "learner", TeacherSignal()),
    ("sdpo", "sampled", "learner", TeacherSignal()),
    ("srpo", "sampled", "learner", TeacherSignal()),
]


@pytest.mark.parametrize(("algorithm", "divergence", "source", "want"), CASES)
def test_each_objective_reads_one_signal_and_every_role_agrees(algorithm, divergence, source, want):
    over = [f"algorithm={algorithm}", f"opd.divergence={divergence}", f"opd.full_vocab_source={source}",
            "teacher.top_k=20", "rollout.group_size=2"]
    if source == "teacher":
        over.append("teacher.engine=hf")
    cfg = load_config("configs/demo.yaml", over)
    assert cfg.teacher_signal == want
    # teacher actors start only for objectives that read a teacher
    assert cfg.needs_teacher == (want.kind != "none")
    # the router hands the learner what the signal says, the learner loads what it says
    assert route_plan(cfg).signal == want
    spec = objective_spec(cfg)
    assert spec.needs_hf_teacher == (want.source == "learner") and spec.needs_teacher_head == want.hidden


def test_sampled_token_objectives_ask_the_teacher_for_no_top_k_rows():
    """A teacher.top_k set for another run is not requested (and then thrown away) by OPD on sampled tokens or
    ExOPD."""
    for algorithm in ("opd", "exopd"):
        cfg = load_config("configs/demo.yaml",
                          [f"algorithm={algorithm}", "opd.divergence=sampled", "teacher.top_k=20"])
        assert cfg.teacher_signal.top_k == 0 and cfg.teacher_signal.scored_by_actor


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        teacher_signal(get("ppo"), "sampled", "learner", 0)
