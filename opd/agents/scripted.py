"""Scripted episodes: a rollout engine that plays given turns, so the episode runner builds the same ledger a
live episode would have (the tool task's teacher learns from them, ``opd.agents.tool_bootstrap``)."""

from __future__ import annotations

import random

from opd.agents.env import EnvSpec
from opd.agents.runner import EpisodeRunner, open_episode
from opd.tasks.tool_chains import BAD_CALLS, script
from opd.types import Generation, Prompt


class ScriptedEngine:
    """A rollout engine's ``generate`` that plays each episode's script: the episode runner then builds the
    same ledger a live episode would have. Episodes are told apart by their prompt ids, turns by how many
    assistant headers the ids hold."""

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list]):
        self.tok, self.scripts = tokenizer, scripts
        self.header = tokenizer.convert_tokens_to_ids("<|assistant|>")
        self.tool = tokenizer.convert_tokens_to_ids("<|tool|>")

    def generate(self, prompt_ids, *, n, temperature, top_p, max_tokens, seeds=None):
        out = []
        for ids in prompt_ids:
            first = ids.index(self.header) + 1
            turn = self.scripts[tuple(ids[:first])][ids.count(self.header) - 1]
            if callable(turn):
                last = len(ids) - 1 - ids[::-1].index(self.tool)
                obs = self.tok.decode(ids[last + 1:-1], skip_special_tokens=False)
                turn = turn(obs)
            tids = self.tok(turn, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append([Generation(tids[:max_tokens], [0.0] * len(tids[:max_tokens]), turn, "stop")])
        return out


def transcripts(tokenizer, rows: list[dict], bad_share: float, seed: int, limits) -> list[tuple[list, list]]:
    """(ids, loss mask) of each row's scripted episode with the built-in ``calc`` tool; a ``bad_share`` of
    them open with a failing call, which is masked (the recovery is learned, not the mistake). Raises if a
    script does not end answered and right (a broken recipe)."""
    rng, spec = random.Random(seed), EnvSpec("tools", ("calc",))
    prompts, scripts, bad_calls = [], {}, []
    for i, row in enumerate(rows):
        prompt = episode_prompt(row, i)
        ids = open_episode(tokenizer, spec.make(describe_tools=False), prompt, 0, True).prompt_ids()
        bad = rng.choice(BAD_CALLS) if rng.random() < bad_share else None
        scripts[tuple(ids)] = script(row, bad)
        prompts.append((prompt, 0))
        bad_calls.append(bad is not None)
    runner = EpisodeRunner(ScriptedEngine(tokenizer, scripts), tokenizer, spec, limits)
    out = []
    samples = runner.run(prompts, n=1, temperature=0.0, top_p=1.0, seed=seed, version=0)
    for (p, _), s, bad in zip(prompts, samples, bad_calls, strict=True):
        if s.episode.stop != "answered" or s.response_text != p.answer:
            raise RuntimeError(f"scripted episode for {p.prompt_id!r} ended {s.episode.stop!r} with "
                               f"{s.response_text!r}, not {p.answer!r}")
        mask = list(s.loss_mask)
        if bad:  # the failing call is context to recover from, never a target
            _, start, end = next(span for span in s.episode.spans if span[0] == "sampled")
            mask[start:end] = [0] * (end - start)
        out.append((list(s.prompt.token_ids) + list(s.response_ids), [0] * len(s.prompt.token_ids) + mask))
    return out


def episode_prompt(row: dict, i: int) -> Prompt:
    """Row ``i`` as a prompt an episode opens from (the runner renders it with the tools itself)."""
    return Prompt(f"row{i}", str(row["prompt"]), [], str(row["answer"]), {})
