"""Byte alignment of two tokenisations of the same text, and on-policy distillation credit on its chunks: the
pure parts of a teacher whose tokenizer is not the student's (ALM-style; ``docs`` in the cross-tokenizer
reference).

Both sides are reduced to the UTF-8 bytes each token stands for, taken from the token strings themselves,
never from ``decode()`` (which cleans up spaces and substitutes U+FFFD for a split character): byte-level BPE
maps its printable stand-ins (``Ġ`` for a space, ``Ċ`` for a newline) back to bytes; SentencePiece writes a
space as ``▁`` and a byte it has no piece for as ``<0xNN>``. A chunk closes wherever both sides end on the
same byte, so chunks partition both token lists and cover equal byte spans.

    >>> s_chunk, t_chunk, n = align([b"Hello", b" world"], [b"Hel", b"lo", b" wor", b"ld"])
    >>> s_chunk, t_chunk, n
    ([0, 1], [0, 0, 1, 1], 2)
    >>> [round(a, 6) for a in chunk_advantages([-1.0, -2.0], [-0.5, -0.1, -1.0, -0.2], s_chunk, t_chunk)]
    [0.4, 0.8]
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from functools import cache
from typing import Literal

Family = Literal["byte_level", "sentencepiece", "plain"]  # plain: a piece is its text (the demo's characters)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's reversible map from bytes to printable characters, inverted (character -> byte)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(piece: str, family: Family) -> bytes:
    """The UTF-8 bytes a vocabulary entry stands for."""
    if family == "byte_level":
        table = _byte_level_table()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode()  # an added token written as plain text (e.g. "<|im_end|>")
    if family == "sentencepiece":
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode()
    if family == "plain":
        return piece.encode()
    raise ValueError(f"unknown tokenizer family {family!r}; valid: byte_level, sentencepiece, plain")


_FAMILIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def family_of(tokenizer) -> Family:
    """How ``tokenizer``'s pieces write bytes, read from its decoder (its ``tokenizer.json``); read once per
    tokenizer (serialising a 262k vocabulary takes over a second)."""
    if (known := _FAMILIES.get(tokenizer)) is None:
        known = _FAMILIES[tokenizer] = _read_family(tokenizer)
    return known


def _read_family(tokenizer) -> Family:
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    steps = [decoder, *decoder.get("decoders", [])]
    kinds = {d.get("type") for d in steps}
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"Metaspace", "ByteFallback"} or any(d.get("pattern", {}).get("String") == "▁" for d in steps):
        return "sentencepiece"
    return "plain"


def ids_bytes(tokenizer, ids: list[int], family: Family | None = None) -> list[bytes]:
    """The bytes of each token of ``ids``, from the vocabulary's pieces (never ``decode()``)."""
    family = family or family_of(tokenizer)
    return [token_bytes(p, family) for p in tokenizer.convert_ids_to_tokens(ids)]


def align(student: list[bytes], teacher: list[bytes]) -> tuple[list[int], list[int], int]:
    """(chunk of each student token, chunk of each teacher token, number of chunks). Two pointers over the
    cumulative byte ends; a chunk closes where both sides end on the same byte and each side has a token in
    it. Raises ``ValueError`` when the two sides do not stand for the same bytes."""
    if b"".join(student) != b"".join(teacher):
        raise ValueError("the two tokenisations do not stand for the same bytes")
    s_chunk, t_chunk = [0] * len(student), [0] * len(teacher)
    i = j = chunk = s_at = t_at = 0
    s_in = t_in = False  # whether the open chunk has a token of that side yet
    while i < len(student) or j < len(teacher):
        # a token of no bytes (the rest of a run ``_valid_pieces`` replaced) goes with the token before it
        if 0 < i < len(student) and not student[i]:
            s_chunk[i], i = s_chunk[i - 1], i + 1
            continue
        if 0 < j < len(teacher) and not teacher[j]:
            t_chunk[j], j = t_chunk[j - 1], j + 1
            continue
        if j == len(teacher) or (i < len(student) and (s_at < t_at or (s_at == t_at and not s_in))):
            s_at, s_chunk[i], s_in, i = s_at + len(student[i]), chunk, True, i + 1
        else:
            t_at, t_chunk[j], t_in, j = t_at + len(teacher[j]), chunk, True, j + 1
        if s_at == t_at and s_in and t_in:
            chunk, s_in, t_in = chunk + 1, False, False
    return s_chunk, t_chunk, chunk


def chunk_sums(values: list[float], chunk: list[int], n: int) -> list[float]:
    out = [0.0] * n
    for v, c in zip(values, chunk, strict=True):
        out[c] += v
    return out


def chunk_advantages(student_lp: list[float], teacher_lp: list[float], s_chunk: list[int], t_chunk: list[int],
                     coef: float = 1.0) -> list[float]:
    """Each student token's advantage ``-coef * (l_S(c) - l_T(c))`` of its chunk ``c`` (l: the sum of a side's
    log-probs over its tokens in the chunk). The chunks' log-ratios sum to the sequence's; with one token a
    chunk on both sides it is the per-token OPD advantage."""
    n = max([*s_chunk, *t_chunk], default=-1) + 1
    ls, lt = chunk_sums(student_lp, s_chunk, n), chunk_sums(teacher_lp, t_chunk, n)
    return [-coef * (ls[c] - lt[c]) for c in s_chunk]


@dataclass(frozen=True)
class CrossView:
    """The teacher's view of one student sample: ids the teacher scores, and where each side's response
    tokens fall in the chunks. ``s_chunk[t] == -1``: student token t is not trained (``reason`` says why)."""

    teacher_ids: list[int]  # the teacher-templated prompt, then the response in the teacher's tokens
    teacher_prompt_len: int
    s_chunk: list[int]
    t_chunk: list[int]
    n_chunks: int
    # what was not scored as it is, comma-joined: "bytes" (no round trip: all masked), "utf8" (bytes that are
    # not UTF-8, scored as U+FFFD), "truncated" (the last chunk masked), "truncated-tail-scored" (a truncated
    # sample whose last chunk is most of it, scored all the same)
    reason: str | None = None


def teacher_prompt(teacher_tok, messages: list[dict]) -> list[int]:
    """The prompt in the teacher's own chat template and ids. The template writes any BOS itself: tokenising
    its text without special tokens never doubles it."""
    text = teacher_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return teacher_tok(text, add_special_tokens=False)["input_ids"]


def teacher_view(student_tok, teacher_tok, messages: list[dict], response_ids: list[int],
                 truncated: bool = False) -> CrossView:
    """``response_ids`` (the student's) as the teacher sees them: the prompt rendered from ``messages`` by the
    teacher's own chat template, then the response's exact bytes tokenised by the teacher; the student's end
    token, where it drew one, maps to the teacher's as a chunk of its own, so stopping is distilled. A sample
    whose bytes do not round-trip through the teacher is masked whole; bytes that are not UTF-8 reach the
    teacher as U+FFFD (``_valid_pieces``); the last chunk of a ``truncated`` one (cut at its length budget) is
    masked unless it holds more than half the sample's tokens."""
    prompt = teacher_prompt(teacher_tok, messages)
    ended = bool(response_ids) and response_ids[-1] == student_tok.eos_token_id
    body = response_ids[:-1] if ended else response_ids
    pieces, dirty = _valid_pieces(ids_bytes(student_tok, body))
    t_body = teacher_tok(b"".join(pieces).decode("utf-8"), add_special_tokens=False)["input_ids"]
    try:
        s_chunk, t_chunk, n = align(pieces, ids_bytes(teacher_tok, t_body))
    except ValueError:
        return CrossView(prompt, len(prompt), [-1] * len(response_ids), [], 0, "bytes")
    if ended:
        s_chunk, t_chunk, n = s_chunk + [n], t_chunk + [n], n + 1
        t_body = t_body + [teacher_tok.eos_token_id]
    drop, reasons = set(), ["utf8"] if dirty else []
    if truncated and not ended:
        # The last chunk's teacher tokens see a word the student had not finished, so its log-prob is only a
        # lower bound of the teacher's probability of those bytes as a prefix: masked. Unless that chunk is
        # most of the sample (a whitespace run is one Gemma token): a sample masked whole gives no signal,
        # and a student drawn into such runs never learns its way out; scored, the bound pushes it away.
        tail = s_chunk.count(n - 1) * 2 > len(body)
        drop |= set() if tail else {n - 1}
        reasons.append("truncated-tail-scored" if tail else "truncated")
    s_chunk = [-1 if c in drop else c for c in s_chunk]
    return CrossView(prompt + t_body, len(prompt), s_chunk, t_chunk, n, ",".join(reasons) or None)


def _valid_pieces(pieces: list[bytes]) -> tuple[list[bytes], set[int]]:
    """``pieces`` with each run of bytes that is not UTF-8 (a stray byte token; a character cut by the length
    budget) replaced by U+FFFD, given to the token where the run starts; and the tokens that held such bytes.

    The teacher reads U+FFFD there and its chunk is scored as such: a stand-in (the teacher's log-prob of a
    character it all but never writes) rather than a mask, because masked output is a haven — sampled-token
    OPD's advantages are mostly negative while the student is far from the teacher, so every scored token is
    pushed down and unscored output gains; a 10-layer student drifted into samples of stray bytes alone."""
    joined, bad, at = b"".join(pieces), [], 0
    while True:
        try:
            joined[at:].decode("utf-8")
            break
        except UnicodeDecodeError as e:
            bad.append((at + e.start, at + e.end))
            at += e.end
    if not bad:
        return pieces, set()
    out, dirty, start = [], set(), 0
    for i, piece in enumerate(pieces):
        kept = bytearray()
        for j in range(start, start + len(piece)):
            run = next((r for r in bad if r[0] <= j < r[1]), None)
            if run is None:
                kept.append(joined[j])
            else:
                dirty.add(i)
                kept += "\ufffd".encode() if j == run[0] else b""
        out.append(bytes(kept))
        start += len(piece)
    return out, dirty


def byte_matches(student_tok, teacher_tok) -> dict[int, int]:
    """Teacher id -> student id for every pair of vocabulary entries that stand for the same bytes (where the
    teacher's top-k is carried over to the student's ids): ``Ġworld`` and ``▁world`` match, which comparing
    raw strings misses. Special tokens are left out (their text is not what they stand for)."""
    def by_bytes(tok) -> dict[bytes, int]:
        family, special = family_of(tok), set(tok.all_special_ids)
        out: dict[bytes, int] = {}
        for piece, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i not in special and (b := token_bytes(piece, family)):
                out.setdefault(b, i)  # the lowest id of pieces that stand for the same bytes
        return out

    student = by_bytes(student_tok)
    return {t: student[b] for b, t in by_bytes(teacher_tok).items() if b in student}
