"""Greedy episodes played by something that answers with text only: the teacher, for its held-out accuracy on
an agent job (the same environment, tools and limits as the student's). Every teacher kind answers so (an
in-cluster actor, ``opd serve-teacher``, an OpenAI-compatible server); the caller routes rows to their
teachers (``opd.steps``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from opd.agents.runner import EpisodeRunner
from opd.types import Generation, Prompt, Sample


class GreedyText:
    """A rollout engine's ``generate`` on ``answer(ids_list, max_tokens) -> texts``: each turn tokenised with
    the job's tokenizer (the pre-flight checked the teacher's is the same). Evaluation only: these ids carry
    no log-probs and nothing trains on them."""

    def __init__(self, answer: Callable[[list[list[int]], int], list[str]], tokenizer):
        self.answer, self.tok = answer, tokenizer

    def generate(self, prompt_ids, *, n, temperature, top_p, max_tokens, seeds=None):
        out = []
        for text in self.answer(prompt_ids, max_tokens):
            ids = self.tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
            reason = "length" if len(ids) >= max_tokens else "stop"
            out.append([Generation(ids, [0.0] * len(ids), text, reason)])
        return out


def greedy_episodes(answer: Callable[[list[list[int]], int], list[str]], prompts: list[Prompt], setup: tuple,
                    tokenizer, max_tokens: int) -> list[Sample]:
    """One greedy episode per prompt, in order; ``setup``: ``opd.agents.episode_setup``."""
    spec, limits = setup
    runner = EpisodeRunner(GreedyText(answer, tokenizer), tokenizer, spec,
                           replace(limits, max_turn_tokens=max_tokens))
    return runner.run([(p, 0) for p in prompts], n=1, temperature=0.0, top_p=1.0, seed=0, version=0)
