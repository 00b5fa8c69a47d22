"""Byte alignment across tokenizers and the chunk credit of on-policy distillation (``opd.teacher.cross``)."""

from __future__ import annotations

from itertools import accumulate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from opd.teacher.cross import (
    _valid_pieces,
    align,
    byte_matches,
    chunk_advantages,
    family_of,
    ids_bytes,
    teacher_view,
    token_bytes,
)


def test_the_hand_worked_pair():
    s_chunk, t_chunk, n = align([b"Hello", b" world"], [b"Hel", b"lo", b" wor", b"ld"])
    assert (s_chunk, t_chunk, n) == ([0, 1], [0, 0, 1, 1], 2)
    adv = chunk_advantages([-1.0, -2.0], [-0.5, -0.1, -1.0, -0.2], s_chunk, t_chunk, coef=1.0)
    assert adv == pytest.approx([0.4, 0.8])


def test_crossing_tokens_are_one_chunk():
    s_chunk, t_chunk, n = align([b"ab", b"c"], [b"a", b"bc"])
    assert (s_chunk, t_chunk, n) == ([0, 0], [0, 0], 1)
    assert chunk_advantages([-0.5, -1.0], [-0.2, -0.3], s_chunk, t_chunk) == pytest.approx([1.0, 1.0])


def test_identical_tokenisations_are_per_token_opd():
    toks = [b"The", b" sum", b" is", b" 4", b"2", b"."]
    s_chunk, t_chunk, n = align(toks, toks)
    assert s_chunk == t_chunk == list(range(len(toks))) and n == len(toks)
    s_lp, t_lp = [-0.1, -2.0, -0.3, -1.5, -0.2, -0.05], [-0.2, -1.0, -0.3, -0.5, -0.9, -0.01]
    per_token = [-0.5 * (s - t) for s, t in zip(s_lp, t_lp, strict=True)]
    assert chunk_advantages(s_lp, t_lp, s_chunk, t_chunk, coef=0.5) == per_token


def test_other_bytes_are_refused():
    with pytest.raises(ValueError, match="same bytes"):
        align([b"ab"], [b"ac"])


@pytest.mark.parametrize(("piece", "family", "want"), [
    ("Ġworld", "byte_level", b" world"), ("Ċ", "byte_level", b"\n"), ("ĠĠ", "byte_level", b"  "),
    ("Ã©", "byte_level", "é".encode()), ("<|im_end|>", "byte_level", b"<|im_end|>"),
    ("▁world", "sentencepiece", b" world"), ("<0xE2>", "sentencepiece", b"\xe2"),
    ("12", "sentencepiece", b"12"),
])
def test_token_bytes_of_both_families(piece, family, want):
    assert token_bytes(piece, family) == want


def test_an_emoji_in_byte_fallback_pieces_aligns_by_bytes_not_characters():
    student = [token_bytes(p, "byte_level") for p in ["Hi", "ĠðŁĺ", "Ģ"]]  # " 😀" as GPT-2 byte characters
    teacher = [token_bytes(p, "sentencepiece") for p in ["Hi", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]]
    assert b"".join(student) == "Hi 😀".encode()
    s_chunk, t_chunk, n = align(student, teacher)
    # both sides end on the emoji's third byte: a chunk closes there, inside the character
    assert (s_chunk, t_chunk, n) == ([0, 1, 2], [0, 1, 1, 1, 1, 2], 3)


def _splits(draw, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=len(data))))
    edges = [0, *[c for c in cuts if c < len(data)], len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


@st.composite
def two_tokenisations(draw):
    text = draw(st.text(min_size=1, max_size=40))
    data = text.encode()
    return _splits(draw, data), _splits(draw, data)


@settings(max_examples=300, deadline=None)
@given(two_tokenisations(), st.data())
def test_chunks_partition_both_sides_into_equal_byte_spans(pair, data):
    student, teacher = pair
    s_chunk, t_chunk, n = align(student, teacher)
    # contiguous, in order, every chunk on both sides
    for chunks in (s_chunk, t_chunk):
        assert chunks[0] == 0 and all(b - a in (0, 1) for a, b in zip(chunks, chunks[1:], strict=False))
        assert chunks[-1] == n - 1
    ends, at = [], 0
    for c in range(n):
        s = b"".join(t for t, k in zip(student, s_chunk, strict=True) if k == c)
        t = b"".join(t for t, k in zip(teacher, t_chunk, strict=True) if k == c)
        assert s == t and s
        at += len(s)
        ends.append(at)
    # the finest such partition: a chunk ends at every byte where both sides end a token, and only there
    assert ends == sorted(set(accumulate(map(len, student))) & set(accumulate(map(len, teacher))))
    s_lp = data.draw(st.lists(st.floats(-20, 0), min_size=len(student), max_size=len(student)))
    t_lp = data.draw(st.lists(st.floats(-20, 0), min_size=len(teacher), max_size=len(teacher)))
    adv = chunk_advantages(s_lp, t_lp, s_chunk, t_chunk)
    # each chunk's log-ratio counted once: they sum to the sequence's
    first = [adv[i] for i in range(len(student)) if i == 0 or s_chunk[i] != s_chunk[i - 1]]
    assert -sum(first) == pytest.approx(sum(s_lp) - sum(t_lp), abs=1e-9)


@pytest.mark.parametrize("text", ["What is 14 + 11?", "  two  spaces\nand a newline", "café 😀 東京 12345"])
def test_a_real_byte_level_vocabulary_round_trips(smollm2, text):
    tok = AutoTokenizer.from_pretrained(smollm2[0])
    assert family_of(tok) == "byte_level"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(ids_bytes(tok, ids)) == text.encode()
    assert b"".join(token_bytes(p, "plain") for p in tok.convert_ids_to_tokens(ids)) != text.encode()


def test_the_demo_vocabulary_is_plain_characters():
    from opd.tasks.tokenizer import build_tokenizer

    tok = build_tokenizer()
    assert family_of(tok) == "plain"
    assert ids_bytes(tok, tok.encode("12+3= x")) == [c.encode() for c in "12+3= x"]


def _sentencepiece_like():
    """A Gemma-style fast tokenizer: BPE over ``▁``-spaced pieces with byte fallback, decoded by replacing
    ``▁`` and fusing ``<0xNN>`` bytes (what Gemma's and Llama 2's tokenizer.json say)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<bos>", *[f"<0x{b:02X}>" for b in range(256)], "▁",
              *"abcdefghijklmnopqrstuvwxyz0123456789+?", "▁i", "▁is"]
    core = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [("▁", "i"), ("▁i", "s")],
                                unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Replace(" ", "▁")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<bos>")
    # a base model's plain template, as the cross path gives Gemma 3 270M
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return tok


@pytest.mark.parametrize("text", ["what is 14+11?", "café 😀 東京", "  two  spaces\n"])
def test_a_byte_fallback_vocabulary_round_trips(text):
    tok = _sentencepiece_like()
    assert family_of(tok) == "sentencepiece"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(ids_bytes(tok, ids)) == text.encode()


def _chars():
    from opd.tasks.tokenizer import build_tokenizer

    return build_tokenizer()


USER = [{"role": "user", "content": "What is 14 + 11?"}]


def test_the_teacher_sees_its_own_template_and_the_students_bytes(smollm2):
    teacher, student = AutoTokenizer.from_pretrained(smollm2[0]), _chars()
    response = student.encode("The sum is 25.") + [student.eos_token_id]
    view = teacher_view(student, teacher, USER, response)
    assert view.reason is None
    prompt = teacher.decode(view.teacher_ids[:view.teacher_prompt_len])
    assert prompt == teacher.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|user|>" not in prompt
    body = view.teacher_ids[view.teacher_prompt_len:]
    assert teacher.decode(body) == "The sum is 25.<|im_end|>" and body[-1] == teacher.eos_token_id
    # the end token is a chunk of its own on both sides; the rest partitions both
    assert view.s_chunk[-1] == view.t_chunk[-1] == view.n_chunks - 1
    assert view.s_chunk.count(view.n_chunks - 1) == view.t_chunk.count(view.n_chunks - 1) == 1
    assert sorted(set(view.s_chunk)) == sorted(set(view.t_chunk)) == list(range(view.n_chunks))
    assert len(view.s_chunk) == len(response) and len(view.t_chunk) == len(body)


def test_a_truncated_sample_loses_its_last_chunk(smollm2):
    teacher, student = AutoTokenizer.from_pretrained(smollm2[0]), _chars()
    response = student.encode("The sum is twen")
    view = teacher_view(student, teacher, USER, response, truncated=True)
    assert view.reason == "truncated" and view.s_chunk[-1] == -1
    kept = [c for c in view.s_chunk if c >= 0]
    assert kept and max(kept) == view.n_chunks - 2


def test_a_truncated_sample_that_is_mostly_its_last_chunk_keeps_it(smollm2):
    """A whitespace run the teacher writes as one token: masked, it would leave the sample dark (a student
    drawn into such runs then has no signal to leave them); scored, the whole sample is trained."""
    teacher, student = AutoTokenizer.from_pretrained(smollm2[0]), _chars()
    view = teacher_view(student, teacher, USER, student.encode("Hi" + " " * 12), truncated=True)
    assert view.reason == "truncated-tail-scored" and -1 not in view.s_chunk
    assert view.s_chunk.count(view.n_chunks - 1) == 12
    short = student.encode("Hello there" + " " * 4)  # the run is under half the sample: masked
    view = teacher_view(student, teacher, USER, short, truncated=True)
    assert view.reason == "truncated" and view.s_chunk[-4:] == [-1] * 4 and -1 not in view.s_chunk[:-4]


def test_a_cut_inside_a_character_masks_the_broken_tail(smollm2):
    student, teacher = AutoTokenizer.from_pretrained(smollm2[0]), _sentencepiece_like()
    ids = student("café 😀", add_special_tokens=False)["input_ids"]
    pieces = ids_bytes(student, ids)
    at = next(i for i in range(1, len(ids)) if _undecodable(b"".join(pieces[:i])))  # inside the emoji
    view = teacher_view(student, teacher, USER, ids[:at], truncated=True)
    assert view.reason == "utf8,truncated" and len(view.s_chunk) == at and view.s_chunk[-1] == -1
    assert teacher.decode(view.teacher_ids[view.teacher_prompt_len:]).startswith("café")
    assert view.teacher_ids.count(teacher.bos_token_id) == 1  # the template's BOS, not doubled


def test_a_stray_byte_reaches_the_teacher_as_a_replacement_character(smollm2):
    """A byte token that is no UTF-8 on its own, mid-sample: the teacher reads U+FFFD in its place and every
    token is scored (masked, such output gained under OPD's mostly negative advantages until a student wrote
    nothing else)."""
    student, teacher = AutoTokenizer.from_pretrained(smollm2[0]), _sentencepiece_like()
    words = [student(w, add_special_tokens=False)["input_ids"] for w in ("The sum", " is 25")]
    stray = student.convert_tokens_to_ids("ð")  # byte 0xF0: the lead byte of a 4-byte character, alone
    response = words[0] + [stray] + words[1]
    view = teacher_view(student, teacher, USER, response)
    assert view.reason == "utf8" and -1 not in view.s_chunk
    at = len(words[0])
    stray_chunk = view.s_chunk[at]
    assert stray_chunk not in view.s_chunk[:at] + view.s_chunk[at + 1:]  # a chunk of its own: only it is off
    body = view.teacher_ids[view.teacher_prompt_len:]
    replaced = [t for t, c in zip(body, view.t_chunk, strict=True) if c == stray_chunk]
    assert teacher.decode(replaced) == "\ufffd"
    assert teacher.decode(body) == "The sum\ufffd is 25"


def test_a_run_of_bad_bytes_across_tokens_stays_in_one_chunk():
    """A run of bytes that is not UTF-8 split over two student tokens: U+FFFD goes to the first, the second is
    left with no bytes and joins its chunk, wherever the run sits."""
    for pieces, teacher in (([b"ab", b"\xf0", b"\x9f"], [b"ab", "\ufffd".encode()]),
                            ([b"\xf0", b"\x9f", b"cd"], ["\ufffd".encode(), b"cd"])):
        valid, dirty = _valid_pieces(pieces)
        s_chunk, t_chunk, n = align(valid, teacher)
        at = pieces.index(b"\xf0")
        assert dirty == {at, at + 1} and s_chunk[at] == s_chunk[at + 1]
        assert sorted(set(s_chunk)) == sorted(set(t_chunk)) == list(range(n)) and n == 2


def _undecodable(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


def test_bytes_the_teacher_cannot_spell_mask_the_sample(smollm2):
    student, teacher = AutoTokenizer.from_pretrained(smollm2[0]), _chars()
    response = student("25 😀", add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    view = teacher_view(student, teacher, USER, response)
    assert view.reason == "bytes" and view.s_chunk == [-1] * len(response)


def test_vocabularies_match_by_bytes_not_raw_strings(smollm2):
    teacher, student = AutoTokenizer.from_pretrained(smollm2[0]), _chars()
    matches = byte_matches(student, teacher)
    space = teacher.convert_tokens_to_ids("Ġ")
    assert matches[space] == student.convert_tokens_to_ids(" ")  # "Ġ" is no " " by string
    by_string = set(teacher.get_vocab()) & set(student.get_vocab()) - set(student.all_special_tokens)
    assert len(matches) > len(by_string)
    for c in map(chr, range(33, 127)):  # printable ASCII: one piece each side, the same bytes
        assert matches[teacher.convert_tokens_to_ids(c)] == student.convert_tokens_to_ids(c)
    assert teacher.eos_token_id not in matches and all(0 <= s < len(student) for s in matches.values())
