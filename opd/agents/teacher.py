"""The teacher's own episodes, for its held-out accuracy on an agent job: the same environment, tools and
limits as the student's, greedy. Any teacher answers (an in-cluster actor, ``opd serve-teacher``, an
OpenAI-compatible server), since each turn only needs its greedy text; rows go to their own teacher
(``teacher.column``)."""

from __future__ import annotations

from dataclasses import replace

from opd.agents.runner import EpisodeRunner
from opd.rollout.engine import Generation
from opd.teacher.multi import teacher_name
from opd.types import Prompt, Sample


class GreedyText:
    """A rollout engine's ``generate`` on a teacher that answers with text: each turn tokenised with the
    job's tokenizer (the pre-flight checked the teacher's is the same). Evaluation only: these ids carry no
    log-probs and nothing trains on them."""

    def __init__(self, answer, tokenizer):
        self.answer, self.tok = answer, tokenizer

    def generate(self, prompt_ids, *, n, temperature, top_p, max_tokens, seeds=None):
        out = []
        for text in self.answer(prompt_ids, max_tokens):
            ids = self.tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
            reason = "length" if len(ids) >= max_tokens else "stop"
            out.append([Generation(ids, [0.0] * len(ids), text, reason)])
        return out


def teacher_episodes(teacher, prompts: list[Prompt], setup: tuple, tokenizer, max_tokens: int,
                     column: str | None) -> list[Sample]:
    """One greedy episode per prompt, played by the prompt's teacher (``teacher``: ``opd.teacher.multi``'s
    ``generate_greedy(prompts, max_tokens)``), in order."""
    spec, limits = setup
    limits = replace(limits, max_turn_tokens=max_tokens)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(teacher_name(p, column), []).append(i)
    out: list = [None] * len(prompts)
    for name, idx in groups.items():
        cols = {column: name} if column else {}

        def answer(ids_list, n_tokens, cols=cols):
            return teacher.generate_greedy([Prompt("turn", "", ids, "", cols) for ids in ids_list], n_tokens)

        runner = EpisodeRunner(GreedyText(answer, tokenizer), tokenizer, spec, limits)
        samples = runner.run([(prompts[i], 0) for i in idx], n=1, temperature=0.0, top_p=1.0, seed=0,
                             version=0)
        for i, s in zip(idx, samples, strict=True):
            out[i] = s
    return out
