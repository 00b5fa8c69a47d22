"""A teacher with another tokenizer in a job (``teacher.tokenizer``): the scores it hands back per student
token, the chunk credit the objectives give them, what the config and the pre-flight refuse, and a job on the
tiny pair whose teacher's vocabulary merges digit pairs (local Ray, vLLM, the learner)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from opd.config import ConfigError, load_config
from opd.plan import spec_of
from opd.teacher.cross import CrossView, align
from opd.teacher.cross_teacher import student_rows
from opd.trainer.advantages import opd_token_advantages
from opd.trainer.objectives.loss import Aux, chunk_credit, token_loss


def _view(student: list[bytes], teacher: list[bytes]) -> CrossView:
    s_chunk, t_chunk, n = align(student, teacher)
    return CrossView([], 0, s_chunk, t_chunk, n)


def _advantages(view: CrossView, student_lp: list[float], teacher_lp: list[float]) -> list[float]:
    rows = student_rows(view, teacher_lp)
    values, chunks = rows.values, rows.chunks
    adv = opd_token_advantages(torch.tensor([student_lp]), torch.tensor([values]), torch.ones(1, len(values)))
    return chunk_credit(adv, torch.tensor([chunks])).flatten().tolist()


def test_the_hand_worked_pair_through_the_scores_and_the_chunk_credit():
    view = _view([b"Hello", b" world"], [b"Hel", b"lo", b" wor", b"ld"])
    rows = student_rows(view, [-0.5, -0.1, -1.0, -0.2])
    assert rows.values == pytest.approx([-0.6, -1.2]) and rows.chunks == [0, 1]
    assert rows.counts == {"student_tokens": 2, "scored_tokens": 2, "chunks": 2, "one_to_one": 0,
                           "teacher_tokens": 4, "topk_rows": 0, "topk_mass": 0.0, "topk_matched_mass": 0.0}
    assert _advantages(view, [-1.0, -2.0], [-0.5, -0.1, -1.0, -0.2]) == pytest.approx([0.4, 0.8])
    # the crossing pair: one chunk, each student token carries its whole log-ratio
    crossing = _view([b"ab", b"c"], [b"a", b"bc"])
    assert student_rows(crossing, [-0.2, -0.3]).values == pytest.approx([0.0, -0.5])
    assert _advantages(crossing, [-0.5, -1.0], [-0.2, -0.3]) == pytest.approx([1.0, 1.0])


def test_unscored_tokens_get_nothing_and_one_token_chunks_are_todays_opd_bit_for_bit():
    masked = CrossView([], 0, [0, -1], [0], 1, "truncated")
    assert _advantages(masked, [-1.0, -2.0], [-0.5]) == pytest.approx([0.5, 0.0])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    targets, mask = torch.randint(0, 11, (3, 5), generator=gen), torch.ones(3, 5, dtype=torch.float64)
    mask[2, 3:] = 0
    sampler = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) - 0.01
    teacher, ref = -torch.rand(3, 5, generator=gen, dtype=torch.float64), sampler - 0.2
    identity = torch.arange(5).repeat(3, 1)
    for spec in (spec_of("algorithm=opd"), spec_of("algorithm=exopd"), spec_of("algorithm=opd_reward")):
        out = []
        for chunk in (None, identity):
            x = logits.clone().requires_grad_(True)
            loss, _ = token_loss(spec, x, targets, mask, sampler, torch.zeros_like(mask),
                                 Aux(teacher_logp_BT=teacher, ref_logp_BT=ref, chunk_BT=chunk))
            loss.sum().backward()
            out.append((loss.detach(), x.grad))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1]), spec.name
    # two tokens a chunk: the learning signal moves, so the identity above is not vacuous
    x = logits.clone().requires_grad_(True)
    loss, _ = token_loss(spec_of("algorithm=opd"), x, targets, mask, sampler, torch.zeros_like(mask),
                         Aux(teacher_logp_BT=teacher, chunk_BT=identity // 2))
    loss.sum().backward()
    assert not torch.equal(x.grad, out[0][1])


def test_top_k_rows_at_chunk_starts_carried_to_student_ids_by_bytes():
    view = _view([b"Hello", b" world"], [b"Hel", b"lo", b" wor", b"ld"])
    topk = ([[10, 11, 12], [0], [20, 21], [0]], [[-0.5, -1.0, -2.0], [-0.1], [-1.0, -1.5], [-0.2]])
    rows = student_rows(view, [-0.5, -0.1, -1.0, -0.2], topk, {11: 3, 12: 7, 21: 9})
    # in the teacher's order; "Hel" (10) and " wor" (20) have no student token of the same bytes: the tail's
    assert rows.topk_ids == [[3, 7], [9]] and rows.topk_logprobs == [[-1.0, -2.0], [-1.5]]
    assert rows.counts["topk_rows"] == 2
    assert rows.counts["topk_mass"] == pytest.approx(sum(map(math.exp, [-0.5, -1.0, -2.0, -1.0, -1.5])))
    assert rows.counts["topk_matched_mass"] == pytest.approx(sum(map(math.exp, [-1.0, -2.0, -1.5])))
    crossing = student_rows(_view([b"ab", b"c"], [b"a", b"bc"]), [-0.2, -0.3], ([[5], [6]], [[-0.2], [-0.3]]),
                            {5: 1, 6: 2})
    assert crossing.topk_ids == [[1], []]  # the chunk's second student token has no row


def test_positions_without_a_top_k_row_are_out_of_the_divergence():
    from opd.trainer.forward import topk_tensors

    ids, lps, has = topk_tensors([[[3, 7], [], [9]]], [[[-1.0, -2.0], [], [-0.5]]], 4)
    assert ids.tolist() == [[[3, 7], [0, 0], [9, 9], [0, 0]]] and has.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert lps[0, 2].tolist() == [-0.5, -1e4] and lps[0, 1].tolist() == [-1e4, -1e4]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, 11, generator=gen, dtype=torch.float64)
    targets, mask = torch.tensor([[3, 1, 9, 2]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    sampler = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    spec = spec_of("opd.divergence=teacher_topk", "teacher.top_k=2")
    loss, count = token_loss(spec, logits, targets, mask, sampler, torch.zeros_like(mask),
                             Aux(topk_ids_BTK=ids, topk_logp_BTK=lps.double(), topk_rows_BT=has.double()))
    assert count.tolist() == [[1.0, 0.0, 1.0, 0.0]] and loss[0, 1] == 0 and loss[0, 0] > 0 and loss[0, 2] > 0
    # the padding left the row's divergence as it was
    one = Aux(topk_ids_BTK=torch.tensor([[[9]]]), topk_logp_BTK=torch.tensor([[[-0.5]]], dtype=torch.float64))
    alone, _ = token_loss(spec, logits[:, 2:3], targets[:, 2:3], mask[:, 2:3], sampler[:, 2:3],
                          torch.zeros(1, 1, dtype=torch.float64), one)
    assert loss[0, 2].item() == pytest.approx(alone[0, 0].item(), rel=1e-6)  # the divergence runs in float32


@pytest.mark.parametrize(("setting", "key"), [
    ("opd.divergence=full_vocab", "opd.divergence=full_vocab"),
    ("agent.environment=tools", "agent.environment"),
    ("selection.mode=entropy", "selection.mode"),
])
def test_what_a_cross_teacher_cannot_do_is_a_config_error(setting, key):
    with pytest.raises(ConfigError, match=rf"teacher.tokenizer=cross: .*{key}"):
        load_config(None, ["teacher.tokenizer=cross", setting])


def test_the_round_trip_check_names_what_a_tokenizer_loses():
    """A tokenizer that splits on whitespace and drops it: its bytes of ``a b`` are ``ab``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from opd.tasks.tokenizer import build_tokenizer
    from opd.teacher.preflight import check_cross

    tok = build_tokenizer()
    assert check_cross(tok, tok, ["12+34=", "a b"]) == []
    core = Tokenizer(models.WordLevel({c: i for i, c in enumerate("<ab0123456789+=")}, unk_token="<"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Split("", behavior="isolated")])
    lossy = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<", eos_token="=")
    lossy.chat_template = tok.chat_template
    assert check_cross(tok, lossy, ["12+34=", "a b"]) == [
        "the teacher tokenizer's token bytes of 'a b' do not concatenate to it"]
    assert check_cross(lossy, tok, ["a b"]) == [
        "the student tokenizer's token bytes of 'a b' do not concatenate to it"]
    lossy.chat_template = None
    assert check_cross(tok, lossy, ["12+34="]) == [
        "the teacher's tokenizer has no chat template (set models.chat_template)"]


def merged_digit_teacher(tiny_models: Path, out: Path) -> Path:
    """The tiny teacher with a vocabulary of its own: every pair of digits one token (ids 102-201), its
    embeddings grown to fit. ``46`` is then one teacher token and two student tokens."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (out / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(tiny_models / "teacher")
        tok.add_tokens([AddedToken(f"{i}{j}", normalized=False) for i in range(10) for j in range(10)])
        model = AutoModelForCausalLM.from_pretrained(tiny_models / "teacher")
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return out


@pytest.fixture(scope="module")
def cross_pair(tiny_models, tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("cross")
    (models / "student").symlink_to(tiny_models / "student")
    merged_digit_teacher(tiny_models, models / "teacher")
    return models


def test_the_preflight_picks_the_cross_path_or_names_why_it_cannot(cross_pair, tmp_path):
    from opd.preflight import check_inputs

    cfg = load_config(None, tiny_overrides(cross_pair, tmp_path / "auto"))
    assert cfg.teacher.tokenizer == "auto"
    check_inputs(cfg)
    assert cfg.teacher.tokenizer == "cross"
    same = load_config(None, tiny_overrides(cross_pair, tmp_path / "same", **{"teacher.tokenizer": "same"}))
    with pytest.raises(ConfigError, match="models.teacher: teacher and student tokenizers disagree"):
        check_inputs(same)
    full = load_config(None, tiny_overrides(cross_pair, tmp_path / "full",
                                            **{"opd.divergence": "full_vocab"}))
    with pytest.raises(ConfigError, match="models.teacher: its vocabulary is not the student's.*full_vocab"):
        check_inputs(full)


@pytest.mark.slow
def test_a_job_with_a_teacher_of_another_vocabulary(cross_pair, local_ray, tmp_path):
    """Two steps of top-k OPD through local Ray, vLLM and the learner, the teacher scoring its own tokens of
    the student's answers (``teacher.tokenizer: auto`` finds the vocabularies differ): digit pairs are one
    teacher token, so chunks of two student tokens are common, and a chunk's top-k row keeps the teacher's
    single digits (the student's ids of the same bytes) and leaves its digit pairs to the tail; the teacher's
    accuracy is its own, on prompts its template rendered. (Sampled-token OPD takes the same path to the
    learner, which gives it the chunk credit unit-tested above.)"""
    from conftest import answered_right

    from opd.data import load_tokenizer
    from opd.driver import run
    from opd.preflight import load_prompts

    out = tmp_path / "cross"
    cfg = load_config(None, tiny_overrides(cross_pair, out, **{
        "rollout.max_new_tokens": 6, "teacher.top_k": 5, "opd.divergence": "teacher_topk"}))
    summary = run(cfg, progress=False)
    assert summary["steps"] == 2
    # the teacher's greedy answers to the held-out prompts rendered in its own tokens (digit pairs merged:
    # its untrained pair embeddings answer few right; the student's ids would give it its old accuracy)
    held_out = load_prompts(cfg, load_tokenizer(str(cross_pair / "teacher")))[1]
    assert all(len(p.token_ids) < len(p.text) - 5 for p in held_out)  # merged: fewer ids than characters
    right = answered_right(cross_pair / "teacher", held_out, cfg.eval.max_new_tokens)
    assert summary["teacher_accuracy"] == sum(right) / len(right)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert 0 < r["cross_one_to_one"] < 1 and r["cross_chunk_tokens"] > 1
        assert r["cross_teacher_tokens_per_token"] < 1 and r["cross_scored_fraction"] > 0.5
        assert r["update_skipped"] == 0.0 and 0 < r["teacher_kl"] < 50
        assert 0 < r["cross_topk_matched_mass"] < 1
    assert "tokenizer: cross" in (out / "config.yaml").read_text()


def test_uld_is_the_l1_distance_of_the_sorted_top_k_probabilities():
    from opd.trainer.divergences import sorted_topk_l1

    gen = torch.Generator().manual_seed(3)
    student = torch.log_softmax(torch.randn(2, 3, 7, generator=gen, dtype=torch.float64), -1)
    teacher = torch.log_softmax(torch.randn(2, 3, 9, generator=gen, dtype=torch.float64), -1)
    teacher = teacher[..., [4, 0, 7, 2]]  # four of its probabilities, not in order
    got = sorted_topk_l1(student, teacher)
    for b in range(2):  # from scratch: each side's K largest probabilities, largest first, paired by rank
        for t in range(3):
            s = sorted((math.exp(x) for x in student[b, t].tolist()), reverse=True)[:4]
            p = sorted((math.exp(x) for x in teacher[b, t].tolist()), reverse=True)
            want = sum(abs(x - y) for x, y in zip(s, p, strict=True))
            assert got[b, t].item() == pytest.approx(want, rel=1e-5)
    # the teacher's own top-k of the student's distribution, in any order and under other ids: distance 0
    same = student.topk(4, dim=-1).values.flip(-1)
    assert torch.allclose(sorted_topk_l1(student, same), torch.zeros(2, 3), atol=1e-6)
    # through the objective: a step along its gradient brings the sorted probabilities closer
    logits = torch.randn(1, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    spec, mask = spec_of("opd.divergence=uld", "teacher.top_k=4"), torch.ones(1, 3, dtype=torch.float64)
    targets = torch.tensor([[0, 1, 2]])
    aux = Aux(topk_ids_BTK=torch.zeros(1, 3, 4, dtype=torch.long), topk_logp_BTK=teacher[:1])
    loss, _ = token_loss(spec, logits, targets, mask, torch.log_softmax(logits, -1).gather(
        -1, targets.unsqueeze(-1)).squeeze(-1).detach(), torch.zeros_like(mask), aux)
    loss.sum().backward()
    after = sorted_topk_l1(torch.log_softmax(logits.detach() - 0.5 * logits.grad, -1), teacher[:1])
    assert after.sum() < sorted_topk_l1(torch.log_softmax(logits.detach(), -1), teacher[:1]).sum()


def test_uld_rows_are_the_teachers_as_they_are():
    view = _view([b"ab", b"c"], [b"a", b"bc"])
    rows = student_rows(view, [-0.2, -0.3], ([[5, 8], [6, 9]], [[-0.2, -2.0], [-0.3, -1.5]]), None)
    assert rows.topk_ids == [[0, 1], []] and rows.topk_logprobs == [[-0.2, -2.0], []]
    assert rows.counts["topk_matched_mass"] == rows.counts["topk_mass"]
    with pytest.raises(ConfigError, match="opd.divergence=uld needs teacher.top_k > 0"):
        load_config(None, ["opd.divergence=uld"])
    assert load_config(None, ["teacher.tokenizer=cross", "opd.divergence=uld", "teacher.top_k=20"])


def test_a_batch_the_teacher_scored_nothing_of_has_no_kl_not_zero():
    """A student that only writes what the teacher cannot score (one long chunk cut at the budget, bytes that
    do not round-trip) would otherwise show a held-out KL of 0."""
    from opd.trainer.routing import teacher_reverse_kl
    from opd.types import Prompt, RolloutBatch, Sample, TeacherScores

    sample = Sample("u0", Prompt("p0", "", [1], "", {"prompt": "x"}), 0, [5, 6], "", [-1.0, -2.0], 0,
                    "length")
    batch = RolloutBatch(0, [sample], 1, 0)
    unscored = TeacherScores(["u0"], [[0.0, 0.0]], chunks=[[-1, -1]])
    assert teacher_reverse_kl(batch, unscored) is None
    half = TeacherScores(["u0"], [[-0.5, 0.0]], chunks=[[0, -1]])
    assert teacher_reverse_kl(batch, half) == pytest.approx(-0.5)
