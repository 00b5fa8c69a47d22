"""A teacher with another tokenizer, as a teacher actor (``teacher.tokenizer=cross``): each student sample is
scored on the teacher's own view of it (``opd.teacher.cross.teacher_view``: the teacher's chat template, the
student's bytes in the teacher's tokens), and the scores come back per student token, chunk by chunk.

The engine behind it is unchanged (it scores ids). What the learner gets is a ``TeacherScores`` aligned with
the student's tokens: each token's byte-aligned chunk (``chunks``, -1 where the teacher scored nothing) and
the chunk's teacher log-prob on its last student token, 0 on the others, so the values of a chunk sum to
the teacher's log-prob of its bytes. The objectives then credit every token of a chunk with the chunk's
log-ratio (``opd.trainer.objectives.loss.chunk_credit``).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

from opd.teacher.cross import CrossView, byte_matches, chunk_sums, teacher_prompt, teacher_view
from opd.types import Prompt, Sample, TeacherScores

# summed over samples, read as the step's cross_* metrics (opd.steps)
CROSS_COUNTS = ("student_tokens", "scored_tokens", "chunks", "one_to_one", "teacher_tokens", "topk_rows",
                "topk_mass", "topk_matched_mass")


@dataclass
class StudentRows:
    """One sample's teacher scores per student token (``TeacherScores`` rows)."""

    values: list[float]  # the chunk's teacher log-prob on its last token, 0 elsewhere
    chunks: list[int]  # each token's chunk, -1 where not scored
    counts: dict[str, float]  # CROSS_COUNTS
    # at a chunk's first token: the teacher's top-k at its first token of the chunk, as the student's ids of
    # the same bytes (the others' mass is left to the tail); elsewhere empty
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


def student_rows(view: CrossView, teacher_lp: list[float], topk: tuple[list, list] | None = None,
                 to_student: dict[int, int] | None = None) -> StudentRows:
    """A sample's rows from the teacher's log-probs of its own response tokens (and, with ``topk``, its top-k
    rows there, carried to student ids by ``to_student``: ``opd.teacher.cross.byte_matches``; None: as they
    are, for ULD)."""
    totals = chunk_sums(teacher_lp, view.t_chunk, view.n_chunks)
    last = {c: t for t, c in enumerate(view.s_chunk) if c >= 0}
    values = [totals[c] if c >= 0 and last[c] == t else 0.0 for t, c in enumerate(view.s_chunk)]
    s_len, t_len = Counter(c for c in view.s_chunk if c >= 0), Counter(view.t_chunk)
    counts = {"student_tokens": len(view.s_chunk), "scored_tokens": sum(s_len.values()), "chunks": len(s_len),
              "one_to_one": sum(1 for c, n in s_len.items() if n == 1 and t_len.get(c) == 1),
              "teacher_tokens": len(view.t_chunk), "topk_rows": 0, "topk_mass": 0.0, "topk_matched_mass": 0.0}
    rows = StudentRows(values, list(view.s_chunk), counts)
    if topk is None:
        return rows
    t_first = {}
    for u, c in enumerate(view.t_chunk):
        t_first.setdefault(c, u)
    rows.topk_ids, rows.topk_logprobs = [[] for _ in view.s_chunk], [[] for _ in view.s_chunk]
    seen_chunks = set()
    for t, c in enumerate(view.s_chunk):
        if c < 0 or c in seen_chunks:
            continue
        seen_chunks.add(c)
        ids, lps = topk[0][t_first[c]], topk[1][t_first[c]]
        picked: dict[int, float] = {}
        if to_student is None:  # ULD reads the probabilities alone: the row as it is (ids 0..K-1)
            picked = dict(enumerate(lps))
        else:
            for tid, lp in zip(ids, lps, strict=True):
                if (sid := to_student.get(tid)) is not None and sid not in picked:
                    picked[sid] = lp
        rows.topk_ids[t], rows.topk_logprobs[t] = list(picked), list(picked.values())
        counts["topk_rows"] += 1
        counts["topk_mass"] += sum(math.exp(x) for x in lps)
        counts["topk_matched_mass"] += sum(math.exp(x) for x in picked.values())
    return rows


class CrossTeacher:
    """``opd.teacher.scorer.Teacher`` for a teacher whose tokenizer is not the student's; ``inner`` is built
    in this actor from ``(class, args, kwargs)`` (a local engine, ``opd.teacher.scorer.VLLMTeacher``)."""

    def __init__(self, inner: tuple[type, tuple, dict], student_tokenizer: tuple[str, str | None],
                 teacher_tokenizer: tuple[str, str | None], map_topk: bool = True):
        from opd.data import load_tokenizer

        cls, args, kwargs = inner
        self.inner = cls(*args, **kwargs)
        self.student_tok = load_tokenizer(*student_tokenizer)
        self.teacher_tok = load_tokenizer(*teacher_tokenizer)
        self.to_student: dict[int, int] | None = None  # teacher id -> student id of the same bytes
        self.map_topk = map_topk  # False: top-k rows as the teacher gives them (opd.divergence=uld)

    def view(self, sample: Sample) -> CrossView:
        from opd.data import prompt_messages

        return teacher_view(self.student_tok, self.teacher_tok, prompt_messages(sample.prompt.columns),
                            sample.response_ids, truncated=sample.finish_reason == "length")

    def score(self, samples: list[Sample], top_k: int = 0, hidden: bool = False) -> TeacherScores:
        if hidden:
            raise ValueError("a teacher with another tokenizer sends log-probs, not hidden states")
        if top_k and self.map_topk and self.to_student is None:  # the teacher's vocabulary, once
            self.to_student = byte_matches(self.student_tok, self.teacher_tok)
        t0 = time.perf_counter()
        views = [self.view(s) for s in samples]
        # the teacher's samples: its own ids of each (a view with no teacher token is not sent)
        sent = [i for i, v in enumerate(views) if len(v.teacher_ids) > v.teacher_prompt_len]
        theirs = [_as_teacher_sample(samples[i], views[i]) for i in sent]
        scored = self.inner.score(theirs, top_k, False) if theirs else None
        teacher_lp: list[list[float]] = [[] for _ in samples]
        topk: list[tuple | None] = [None] * len(samples)
        for j, i in enumerate(sent):
            teacher_lp[i] = scored.logprobs[j]
            if top_k:
                topk[i] = scored.topk_ids[j], scored.topk_logprobs[j]
        if top_k:  # a sample with no teacher token: no rows either
            topk = [t if t is not None else ([], []) for t in topk]
        rows = [student_rows(v, lp, k, self.to_student)
                for v, lp, k in zip(views, teacher_lp, topk, strict=True)]
        scores = TeacherScores(uids=[s.uid for s in samples], logprobs=[r.values for r in rows],
                               topk_ids=[r.topk_ids for r in rows] if top_k else None,
                               topk_logprobs=[r.topk_logprobs for r in rows] if top_k else None,
                               score_seconds=time.perf_counter() - t0, chunks=[r.chunks for r in rows],
                               cross_counts={k: sum(r.counts[k] for r in rows) for k in CROSS_COUNTS})
        scores.validate(samples)
        return scores

    def prompt_ids(self, prompts: list[Prompt]) -> list[list[int]]:
        """Each prompt rendered by the teacher's own template, in its own ids (what it answers greedily)."""
        from opd.data import prompt_messages

        return [teacher_prompt(self.teacher_tok, prompt_messages(p.columns)) for p in prompts]

    def generate_greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[str]:
        return self.inner.generate_greedy(prompt_ids, max_tokens)


def _as_teacher_sample(s: Sample, v: CrossView) -> Sample:
    prompt = Prompt(s.prompt.prompt_id, "", v.teacher_ids[: v.teacher_prompt_len], s.prompt.answer)
    response = v.teacher_ids[v.teacher_prompt_len:]
    return Sample(s.uid, prompt, s.group_index, response, "", [0.0] * len(response), s.weight_version)
