"""Per-step lines off a terminal (job logs, CI): every step or throttled, eval results on lines of their
own."""

import io

from opd.monitor.console import Console, eval_line

STEP = {"reward": 0.0625, "accuracy": 0.0625, "teacher_kl": 0.952, "step_seconds": 6.41,
        "rollout_tokens_per_s": 198.0}


def test_a_line_per_step_with_the_figures_a_job_log_needs():
    out = io.StringIO()
    c = Console(total=3, start=0, out=out)
    for step in range(3):
        c.step(step, {**STEP, **({"eval_accuracy": 0.087, "eval_teacher_kl": 0.622} if step == 2 else {})})
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith(
        "step 1/3 | reward 0.0625 | acc 6.2% | teacher_kl 0.952 | 6.41 s/step | 198 tok/s | ETA ")
    assert lines[2].startswith("step 3/3") and lines[2].endswith("ETA 0m00s")
    assert lines[3] == "eval step 3/3 | accuracy 8.7% | teacher_kl 0.622"


def test_fast_steps_are_throttled_but_the_last_one_is_shown():
    out = io.StringIO()
    c = Console(total=50, start=10, out=out, min_interval_s=3600)
    for step in range(10, 50):
        c.step(step, STEP)
    assert [line.split(" |")[0] for line in out.getvalue().splitlines()] == ["step 11/50", "step 50/50"]


def test_held_out_lines_and_the_bar_on_a_terminal():
    assert eval_line("before training", {"eval_accuracy": 0.0, "eval_teacher_kl": 3.05}) == \
        "eval before training | accuracy 0.0% | teacher_kl 3.05"
    out = io.StringIO()
    c = Console(total=2, start=0, bar=True, out=out)
    c.step(0, STEP)
    c.close()
    assert out.getvalue() == ""  # the bar draws on stderr, no step lines
