"""Several teachers in one job: a dataset column names the teacher that scores each sample.

    models:
      teacher: models/math-teacher        # "default": rows with no teacher named
      teachers: {code: models/code-teacher}
    teacher:
      column: teacher                     # dataset column holding "code", or nothing for the default

Each teacher is its own actor; a step's samples are split by teacher, scored in parallel and put back in batch
order, so the learner sees one ``TeacherScores`` exactly as with a single teacher. ``Teachers`` lives in the
driver and hands scoring off (``submit`` returns a ``TeacherCall`` at once); each actor behind it is an
``opd.teacher.scorer.Teacher``.
"""

from __future__ import annotations

import time
from dataclasses import replace

import ray
from ray import ObjectRef

from opd.types import Prompt, Sample, TeacherScores

DEFAULT = "default"


def teacher_name(prompt: Prompt, column: str | None) -> str:
    """The teacher a row asks for; an absent, null or empty value means the default teacher."""
    value = prompt.columns.get(column) if column else None
    return DEFAULT if value is None or value == "" else str(value)


def unknown_teacher_rows(prompts: list[Prompt], column: str | None, names: set[str]) -> list[tuple[str, str]]:
    """``(prompt_id, name)`` of every row naming a teacher the config does not define."""
    return [(p.prompt_id, n) for p in prompts if (n := teacher_name(p, column)) not in names]


class TeacherCall:
    """Scoring in flight on the teacher actors concerned (``PendingScores``); ``result()`` waits for every
    part and gives the batch's ``TeacherScores`` in batch order."""

    def __init__(self, samples: list[Sample], parts: dict[str, tuple[list[int], ObjectRef]],
                 t0: float | None = None):
        self.samples, self.parts = samples, parts
        # merged scores' seconds count from the first call issued
        self.t0 = time.perf_counter() if t0 is None else t0

    @classmethod
    def whole(cls, samples: list[Sample], ref: ObjectRef) -> TeacherCall:
        """One actor scoring every sample, in order (a call chained on the samples' generation)."""
        return cls(samples, {DEFAULT: (list(range(len(samples))), ref)})

    def result(self) -> TeacherScores:
        got = dict(zip(self.parts, ray.get([ref for _, ref in self.parts.values()]), strict=True))
        if len(got) == 1:  # the common case: one teacher scored the whole batch, in order
            return next(iter(got.values()))
        # The parts one after another, then each sample's row taken back to its place in the batch.
        joined = TeacherScores.concat([got[name] for name in self.parts])
        at = {i: j for j, i in enumerate(i for idx, _ in self.parts.values() for i in idx)}
        scores = replace(joined.rows([at[i] for i in range(len(self.samples))]),
                         score_seconds=time.perf_counter() - self.t0)
        scores.validate(self.samples)
        return scores


class Teachers:
    """The job's teacher actors by name: scoring split by each row's teacher (``submit``) and greedy
    answers."""

    def __init__(self, actors: dict[str, object], column: str | None = None, cross: set[str] | None = None):
        if DEFAULT not in actors:
            raise ValueError(f"a default teacher is required; got {sorted(actors)}")
        self.actors = actors
        self.column = column
        # teachers with another tokenizer (opd.teacher.cross_teacher): they render a prompt themselves
        self.cross = cross or set()

    def _split(self, prompts: list[Prompt]) -> dict[str, list[int]]:
        parts: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            parts.setdefault(teacher_name(p, self.column), []).append(i)
        return parts

    def submit(self, samples: list[Sample], top_k: int, hidden: bool = False) -> TeacherCall:
        """Start scoring on every teacher concerned and return at once."""
        t0 = time.perf_counter()
        parts = {name: (idx, self.actors[name].score.remote([samples[i] for i in idx], top_k, hidden))
                 for name, idx in self._split([s.prompt for s in samples]).items()}
        return TeacherCall(samples, parts, t0)

    def generate_greedy(self, prompts: list[Prompt], max_tokens: int) -> list[str]:
        """Each prompt answered by its own teacher (the teacher accuracy a job reports is that of its
        teachers)."""
        parts = self._split(prompts)
        ids = {name: (self.actors[name].prompt_ids.remote([prompts[i] for i in idx]) if name in self.cross
                      else [prompts[i].token_ids for i in idx]) for name, idx in parts.items()}
        refs = {name: self.actors[name].generate_greedy.remote(ids[name], max_tokens) for name in parts}
        texts: list = [None] * len(prompts)
        for name, out in zip(refs, ray.get(list(refs.values())), strict=True):
            for i, text in zip(parts[name], out, strict=True):
                texts[i] = text
        return texts
