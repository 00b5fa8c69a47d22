"""Several teachers in one job: a dataset column names the teacher that scores each sample.

    models:
      teacher: models/math-teacher        # "default": rows with no teacher named
      teachers: {code: models/code-teacher}
    teacher:
      column: teacher                     # dataset column holding "code", or nothing for the default

Each teacher is its own actor; a step's samples are split by teacher, scored in parallel and put back in batch order,
so the learner sees one ``TeacherScores`` exactly as with a single teacher.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from opd.types import Prompt, Sample, TeacherScores

DEFAULT = "default"


def teacher_name(prompt: Prompt, column: str | None) -> str:
    """The teacher a row asks for; an absent, null or empty value means the default teacher."""
    value = prompt.columns.get(column) if column else None
    return DEFAULT if value is None or value == "" else str(value)


def unknown_teacher_rows(prompts: list[Prompt], column: str | None, names: set[str]) -> list[tuple[str, str]]:
    """``(prompt_id, name)`` of every row naming a teacher the config does not define."""
    return [(p.prompt_id, n) for p in prompts if (n := teacher_name(p, column)) not in names]


class Teachers:
    """The job's teacher actors by name, with the single-teacher protocol (score, greedy generation) over all of them."""

    def __init__(self, actors: dict[str, object], column: str | None = None):
        if DEFAULT not in actors:
            raise ValueError(f"a default teacher is required; got {sorted(actors)}")
        self.actors = actors
        self.column = column

    def _split(self, prompts: list[Prompt]) -> dict[str, list[int]]:
        parts: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            parts.setdefault(teacher_name(p, self.column), []).append(i)
        return parts

    def score(self, samples: list[Sample], top_k: int, hidden: bool = False) -> Callable[[], TeacherScores]:
        """Start scoring on every teacher concerned; the returned callable waits and merges in batch order."""
        t0 = time.perf_counter()
        parts = self._split([s.prompt for s in samples])
        refs = {name: self.actors[name].score.remote([samples[i] for i in idx], top_k, hidden) for name, idx in parts.items()}

        def collect() -> TeacherScores:
            got = dict(zip(refs, ray.get(list(refs.values())), strict=True))
            if len(got) == 1:  # the common case: one teacher scored the whole batch, in order
                return next(iter(got.values()))
            n = len(samples)
            logprobs: list = [None] * n
            ids: list | None = [None] * n if top_k else None
            lps: list | None = [None] * n if top_k else None
            hid: list | None = [None] * n if hidden else None
            for name, idx in parts.items():
                part = got[name]
                for j, i in enumerate(idx):
                    logprobs[i] = part.logprobs[j]
                    if top_k:
                        ids[i], lps[i] = part.topk_ids[j], part.topk_logprobs[j]
                    if hidden:
                        hid[i] = part.hidden[j]
            scores = TeacherScores([s.uid for s in samples], logprobs, ids, lps, time.perf_counter() - t0, hid)
            scores.validate(samples)
            return scores

        return collect

    def generate_greedy(self, prompts: list[Prompt], max_tokens: int) -> list[str]:
        """Each prompt answered by its own teacher (the teacher accuracy a job reports is that of its teachers)."""
        parts = self._split(prompts)
        refs = {name: self.actors[name].generate_greedy.remote([prompts[i].token_ids for i in idx], max_tokens) for name, idx in parts.items()}
        texts: list = [None] * len(prompts)
        for name, out in zip(refs, ray.get(list(refs.values())), strict=True):
            for i, text in zip(parts[name], out, strict=True):
                texts[i] = text
        return texts
