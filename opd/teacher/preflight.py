"""Pre-flight checks that a teacher can score a student's tokens: same vocabulary, same rendered prompts.

A teacher whose tokenizer differs even slightly scores different tokens than the student drew, and OPD then
learns from a silently biased signal (lesson 2 of peers' trackers), so a mismatch is a start-up error.
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
