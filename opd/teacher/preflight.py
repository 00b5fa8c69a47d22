"""Pre-flight checks that a teacher can score a student's tokens: same vocabulary, same rendered prompts.

A teacher whose tokenizer differs even slightly scores different tokens than the student drew, and OPD then
learns from a silently biased signal (lesson 2 of peers' trackers), so a mismatch is a start-up error, unless
the teacher scores its own tokens of the same bytes (``teacher.tokenizer=cross``, ``check_cross``).
"""

from __future__ import annotations


class TokenizerMismatch(ValueError):
    pass


def check_tokenizers(student_tok, teacher_tok, sample_prompts: list[str]) -> None:
    problems = []
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(sv))[:5]
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])[:5]
        problems.append(
            f"vocabularies differ (student {len(sv)} tokens, teacher {len(tv)}; only in student: {only_s}, "
            f"only in teacher: {only_t}, different ids: {moved})"
        )
    if student_tok.eos_token != teacher_tok.eos_token:
        problems.append(f"eos tokens differ ({student_tok.eos_token!r} vs {teacher_tok.eos_token!r})")
    for text in sample_prompts:
        msgs = [{"role": "user", "content": text}]
        a = student_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        b = teacher_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if a != b:
            problems.append(f"chat templates render {text!r} differently: {a!r} vs {b!r}")
            break
    if problems:
        raise TokenizerMismatch("teacher and student tokenizers disagree: " + "; ".join(problems))


def check_cross(student_tok, teacher_tok, texts: list[str]) -> list[str]:
    """What keeps a teacher with another tokenizer from scoring the student's samples by bytes: a side whose
    tokens' bytes do not concatenate to the text they came from (the byte alignment would be wrong, not
    merely coarse), a teacher without an end token (stopping could not be distilled) or without a chat
    template."""
    from opd.teacher.cross import ids_bytes

    found = []
    for side, tok in (("student", student_tok), ("teacher", teacher_tok)):
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if b"".join(ids_bytes(tok, ids)) != text.encode():
                found.append(f"the {side} tokenizer's token bytes of {text!r} do not concatenate to it")
                break
    if teacher_tok.eos_token_id is None:
        found.append("the teacher's tokenizer has no end token")
    if not teacher_tok.chat_template:
        found.append("the teacher's tokenizer has no chat template (set models.chat_template)")
    return found
