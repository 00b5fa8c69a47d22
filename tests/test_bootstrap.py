"""Tokenizer and bootstrap checks that run in seconds on a CPU (the tiny spec, never the demo one)."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from opd.tasks.bootstrap import (
    IGNORE_INDEX,
    BootstrapSpec,
    ModelSpec,
    SFTSpec,
    bootstrap,
    build_model,
    demo_spec,
    evaluate_accuracy,
    render_prompt,
    sft,
    sft_example,
    sft_tensors,
    task_splits,
    tiny_spec,
)
from opd.tasks.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_boot(tmp_path_factory):
    out = tmp_path_factory.mktemp("boot") / "models"
    # one thread: two oversubscribed ones can stall for minutes
    meta = bootstrap(out, tiny_spec(), num_threads=1)
    return out, meta


@pytest.mark.parametrize("text", ["12 + 3=", "123+45=", "a  b\n~ !", ""])
def test_decode_is_exact(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character, no BOS
    assert tok.decode(ids) == text


def test_special_tokens(tok):
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>" and tok.unk_token == "<|unk|>"
    assert tok.bos_token is None
    ids = tok.encode("<|user|>1+1=<|assistant|>2<|end|>")
    assert len(ids) == 8 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "1+1=2"


def test_chat_template(tok):
    user = [{"role": "user", "content": "123+45="}]
    assert (tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            == "<|user|>123+45=<|assistant|>")
    full = [{"role": "system", "content": "S"}, *user, {"role": "assistant", "content": "861"}]
    assert (tok.apply_chat_template(full, tokenize=False)
            == "<|system|>S<|user|>123+45=<|assistant|>861<|end|>")


def test_vocabulary_is_deterministic(tok):
    assert build_tokenizer().get_vocab() == tok.get_vocab()
    assert tok.pad_token_id == 0


def test_tokenizer_save_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|system|>x<|user|>907+93=<|assistant|>0001<|end|> \n"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == tok.chat_template
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert loaded.padding_side == "left"
    assert loaded.decode(loaded.encode("12 + 3=")) == "12 + 3="


def test_sft_labels_cover_only_the_response(tok):
    ids, labels = sft_example(tok, "123+45=", "861")
    prompt_ids = tok.encode("<|user|>123+45=<|assistant|>")
    response_ids = tok.encode("861") + [tok.eos_token_id]
    assert ids == prompt_ids + response_ids
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids


def test_sft_tensors_pad_right_and_mask_padding(tok):
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "999+999=", "answer": "8991"}]
    ids, labels, lengths = sft_tensors(tok, rows)
    assert lengths.tolist() == [len(sft_example(tok, r["prompt"], r["answer"])[0]) for r in rows]
    short = lengths[0]
    assert (ids[0, short:] == tok.pad_token_id).all()
    assert (labels[0, short:] == IGNORE_INDEX).all()
    assert (labels[1] != IGNORE_INDEX).sum() == 5  # 4 answer digits + <|end|>


def test_build_model_checks_head_dim(tok):
    model = build_model(ModelSpec(64, 1, 2, 1, 128), tok)
    assert model.config.tie_word_embeddings and model.config.max_position_embeddings == 128
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    with pytest.raises(ValueError, match="head_dim"):
        build_model(ModelSpec(96, 1, 2, 1, 128), tok)  # head_dim 48


@pytest.mark.parametrize(("target", "extend", "steps_run"), [
    (None, 6, 4),  # no target: extension steps would only train past the schedule
    (1.01, 0, 4),  # target unmet, no extension: the schedule's length
    (1.01, 6, 10),  # target unmet: every extension step runs
    (0.0, 6, 2),  # target met at the first check: stop there
])
def test_sft_extends_past_its_schedule_only_while_a_target_is_unmet(tok, target, extend, steps_run):
    rows = task_splits(tiny_spec().task)
    torch.manual_seed(0)
    model = build_model(ModelSpec(64, 1, 2, 1, 128), tok)
    spec = SFTSpec(steps=4, batch_size=8, warmup_steps=1, eval_every=2, stop_at_accuracy=target,
                   extend_steps=extend)
    out = sft(model, tok, rows["train"].select(range(64)), spec, num_threads=1,
              val_rows=rows["val"].select(range(8)))
    assert out["steps"] == steps_run
    assert [s for s, _ in out["val_curve"]] == list(range(2, steps_run + 1, 2))


def test_spec_hash_and_dict_roundtrip():
    spec = demo_spec()
    assert BootstrapSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.hash() == demo_spec().hash() != tiny_spec().hash()


def test_tiny_bootstrap_writes_loadable_checkpoints(tiny_boot, tok):
    out, meta = tiny_boot
    spec = tiny_spec()
    assert json.loads((out / "bootstrap.json").read_text()) == meta
    assert meta["spec_hash"] == spec.hash()
    # Training is driven by steps, so a runaway shows in the counts: the teacher runs its whole schedule; the
    # student stops at its first validation check at or above stop_at_accuracy, else at its last step.
    assert meta["teacher"]["steps"] == spec.teacher_sft.steps
    student, sft = meta["student"], spec.student_sft
    reached = [step for step, acc in student["val_curve"] if acc >= sft.stop_at_accuracy]
    assert student["steps"] == (reached[0] if reached else sft.steps)
    assert ([step for step, _ in student["val_curve"]]
            == list(range(sft.eval_every, student["steps"] + 1, sft.eval_every)))
    # Both learned (below the uniform guess over the vocabulary), the bigger, longer-trained teacher more.
    assert meta["teacher"]["final_loss"] < meta["student"]["final_loss"] < math.log(len(tok))
    test_rows = task_splits(spec.task)["test"]
    for role in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(out / role)
        loaded_tok = AutoTokenizer.from_pretrained(out / role)
        assert isinstance(model, Qwen2ForCausalLM)
        assert loaded_tok.get_vocab() == tok.get_vocab() and loaded_tok.chat_template == tok.chat_template
        assert (out / role / "generation_config.json").exists()
        assert sum(p.numel() for p in model.parameters()) == meta[role]["params"]
        # The recorded accuracy is this checkpoint's: evaluated again from disk, the held-out rows give the
        # same number.
        assert (evaluate_accuracy(model, loaded_tok, test_rows, spec.eval_batch_size, num_threads=1)
                == meta[role]["accuracy"])
        enc = loaded_tok([render_prompt(loaded_tok, "12+34=")], add_special_tokens=False, return_tensors="pt")
        out_ids = model.generate(**enc, max_new_tokens=4, do_sample=False)
        assert out_ids.shape[1] > enc["input_ids"].shape[1]
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # the staging dir was renamed away


def test_second_bootstrap_is_a_cached_noop(tiny_boot, caplog):
    out, meta = tiny_boot
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="opd.bootstrap"):
        again = bootstrap(out, tiny_spec(), num_threads=1)
    assert again == meta
    # Nothing trained (training logs every model's size and its steps) and nothing was written or replaced.
    logged = [r.getMessage() for r in caplog.records if r.name == "opd.bootstrap"]
    assert logged == [f"bootstrap cache hit at {out} (spec {meta['spec_hash']})"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


def test_changed_spec_or_corrupt_cache_rebuilds(tiny_boot, tmp_path):
    out, meta = tiny_boot
    copy = tmp_path / "models"
    shutil.copytree(out, copy)
    (copy / "student" / "model.safetensors").write_bytes(b"not a checkpoint")
    rebuilt = bootstrap(copy, tiny_spec(), num_threads=1)
    assert rebuilt["spec_hash"] == meta["spec_hash"]
    AutoModelForCausalLM.from_pretrained(copy / "student")  # loads again


def test_bootstrap_refuses_to_replace_foreign_dir(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        bootstrap(tmp_path, tiny_spec(), num_threads=1)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_left_padded_eval_matches_unpadded(tok, tiny_boot):
    torch.manual_seed(0)
    model = build_model(ModelSpec(64, 1, 2, 1, 128), tok).eval()
    rows = [{"prompt": p, "answer": "0"} for p in ("1+2=", "999+99=", "12+3=")]
    enc = tok([render_prompt(tok, rows[0]["prompt"])], add_special_tokens=False, return_tensors="pt")
    alone = model.generate(**enc, max_new_tokens=3, do_sample=False)[0, enc["input_ids"].shape[1] :]
    batch = tok([render_prompt(tok, r["prompt"]) for r in rows], padding=True, add_special_tokens=False,
                return_tensors="pt")
    together = model.generate(**batch, max_new_tokens=3, do_sample=False)[0, batch["input_ids"].shape[1] :]
    assert tok.padding_side == "left"
    assert tok.decode(alone, skip_special_tokens=True) == tok.decode(together, skip_special_tokens=True)
    # evaluate_accuracy batches the same way. Its answers are set to what the trained teacher writes for each
    # prompt alone (it ends each with <|end|>, so the token budget does not change them): one left-padded
    # batch must find all three, and not the wrong one.
    teacher = AutoModelForCausalLM.from_pretrained(tiny_boot[0] / "teacher").eval()
    judged = [{"prompt": "5+5=", "answer": "wrong"}]
    for r in rows:
        enc = tok([render_prompt(tok, r["prompt"])], add_special_tokens=False, return_tensors="pt")
        ids = teacher.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1] :]
        assert ids[-1] == tok.eos_token_id
        judged.append({"prompt": r["prompt"], "answer": tok.decode(ids, skip_special_tokens=True)})
    assert evaluate_accuracy(teacher, tok, judged, batch_size=4, num_threads=1) == 0.75
