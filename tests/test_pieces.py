"""Small pure pieces: response alignment, tokenizer pre-flight, prompt cursor, typed-record validation."""

import pytest

from opd.data import Cursor, PromptSource
from opd.rollout.align import response_slice, score_starts
from opd.teacher.preflight import TokenizerMismatch, check_tokenizers
from opd.types import Prompt, RecordError, Sample, TeacherScores, sample_uid


def test_response_rows_are_shifted_by_one():
    # sequence p0 p1 p2 | r0 r1 ; rows score tokens 1..4, so r0 (position 3) is row 2
    rows = ["p1", "p2", "r0", "r1"]
    assert response_slice(3, 2) == slice(2, 4)
    assert rows[response_slice(3, 2)] == ["r0", "r1"]
    assert score_starts([[1, 2, 3], [4, 5]], None) == [1, 1]
    assert score_starts([[1, 2, 3], [4, 5]], [2, 2]) == [2, 2]
    with pytest.raises(ValueError, match="outside 1..2"):
        score_starts([[1, 2, 3], [4, 5]], [1, 3])
    with pytest.raises(ValueError, match="1 score starts for 2 sequences"):
        score_starts([[1, 2, 3], [4, 5]], [1])


def test_preflight_detects_vocab_and_template_mismatch():
    from opd.tasks.tokenizer import build_tokenizer

    a, b = build_tokenizer(), build_tokenizer()
    check_tokenizers(a, b, ["1+2="])
    b.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(TokenizerMismatch, match="chat templates"):
        check_tokenizers(a, b, ["1+2="])
    c = build_tokenizer()
    c.add_tokens(["<|extra|>"])
    with pytest.raises(TokenizerMismatch, match="vocabularies differ"):
        check_tokenizers(a, c, ["1+2="])


def _prompts(n):
    return [Prompt(f"p{i}", "t", [1], "a") for i in range(n)]


def test_cursor_visits_every_prompt_once_per_epoch_and_resumes():
    src = PromptSource(_prompts(5), seed=3)
    first = src.next_batch(3)
    saved = Cursor(**vars(src.cursor))
    rest = src.next_batch(4)
    assert sorted(p.prompt_id for p, _ in first + rest[:2]) == [f"p{i}" for i in range(5)]  # epoch 0 complete
    assert [e for _, e in first + rest] == [0] * 5 + [1] * 2
    resumed = PromptSource(_prompts(5), seed=3, cursor=saved)
    assert resumed.next_batch(4) == rest


def test_sample_ids_stay_unique_when_a_batch_holds_a_prompt_twice():
    """A batch larger than the dataset straddles epochs; the epoch in the id keeps the samples apart."""
    draws = PromptSource(_prompts(3), seed=0).next_batch(5)
    assert len({p.prompt_id for p, _ in draws}) == 3
    uids = {sample_uid(p.prompt_id, g, e) for p, e in draws for g in range(2)}
    assert len(uids) == 10


def test_records_reject_misaligned_rows():
    p = Prompt("p", "t", [1, 2], "a")
    s = Sample("u", p, 0, [3, 4], "x", [-0.1], 0)
    with pytest.raises(RecordError, match="2 response tokens but 1 sampler logprobs"):
        s.validate()
    s.sampler_logprobs = [-0.1, -0.2]
    with pytest.raises(RecordError, match="1 teacher logprobs for 2 response tokens"):
        TeacherScores(["u"], [[-0.3]]).validate([s])


def test_a_nonfinite_teacher_value_is_counted_not_fatal():
    """A teacher answering NaN must not kill the job: the scores validate, the count reaches the step metrics,
    and the learner's non-finite-loss guard skips that update."""
    p = Prompt("p", "t", [1, 2], "a")
    samples = [Sample(u, p, i, [3, 4], "x", [-0.1, -0.2], 0) for i, u in enumerate(["u0", "u1", "u2"])]
    nan = float("nan")
    scores = TeacherScores(["u0", "u1", "u2"], [[-0.3, nan], [-0.3, -0.4], [-0.3, -0.4]],
                           [[[3], [4]]] * 3, [[[-0.3], [-0.4]], [[-0.3], [-0.4]], [[-0.3], [float("-inf")]]])
    scores.validate(samples)
    assert scores.nonfinite_samples() == 2


def test_test_split_is_fixed_by_seed_and_disjoint_from_any_train_size():
    """The demo evaluates on the same held-out problems that bootstrap never trained on, whatever
    num_train."""
    from opd.tasks.arithmetic import build_dataset, exact_answer, make_row

    small, large = (build_dataset(num_train=100, num_test=50, seed=0),
                    build_dataset(num_train=3000, num_test=50, seed=0))
    assert small["test"]["id"] == large["test"]["id"]
    assert not set(large["test"]["id"]) & set(large["train"]["id"])
    row = make_row(987, 65, "+")
    assert (row["answer"] == "2501"
            and exact_answer([row["prompt"]], ["2501 "], answer=[row["answer"]]) == [1.0])
    assert exact_answer(["x"], ["1052"], answer=["2501"]) == [0.0]
