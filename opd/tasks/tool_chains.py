"""Embedded task that needs a tool: chains such as ``347*86+129=`` solved with ``calc``, one operation a call.

A ~1M-parameter character model cannot multiply three digits by two in its head; with the tool the job is
reading the operands, copying them into calls, and copying the last result out. The answer is written in
the usual order (it is copied, not computed).

    >>> row = make_row(347, 86, "+", 129)
    >>> row["prompt"], row["answer"]
    ('347*86+129=', '29971')

The teacher learns from scripted transcripts played through the real episode runner (``transcripts``): the
same ledger, template deltas and tool observations a live episode has, so what it is trained on is exactly
what it will see. Some transcripts start with a bad call (an unknown tool, broken JSON) and recover from the
error the environment returns.
"""

from __future__ import annotations

import json
import random

from datasets import Dataset, DatasetDict

from opd.types import Generation, Prompt

SECOND_OPS = ("+", "-")
BAD_CALLS = ("unknown_tool", "bad_json")


def make_row(a: int, b: int, op: str, c: int) -> dict:
    result = a * b + c if op == "+" else a * b - c
    return {"id": f"{a}*{b}{op}{c}", "prompt": f"{a}*{b}{op}{c}=", "answer": str(result),
            "a": a, "b": b, "op": op, "c": c}


def _number(rng: random.Random, max_digits: int) -> int:
    d = rng.randint(1, max_digits)  # the digit count first, so short operands are as common as long ones
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def build_dataset(num_train: int = 20000, num_test: int = 500, max_digits_a: int = 3, max_digits_b: int = 2,
                  seed: int = 0) -> DatasetDict:
    """Disjoint train/test splits of ``a*b+c`` / ``a*b-c`` chains (``c`` has up to three digits)."""
    rng, test, train = random.Random(seed), {}, []

    def draw() -> dict:
        return make_row(_number(rng, max_digits_a), _number(rng, max_digits_b), rng.choice(SECOND_OPS),
                        _number(rng, 3))

    while len(test) < num_test:
        row = draw()
        test.setdefault(row["id"], row)
    while len(train) < num_train:
        row = draw()
        if row["id"] not in test:
            train.append(row)
    return DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(list(test.values())))


def call(a: int | str, op: str, b: int | str, name: str = "calc") -> str:
    args = {"a": int(a), "op": op, "b": int(b)}
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args}, separators=(',', ':'))}</tool_call>"


def script(row: dict, bad: str | None = None) -> list:
    """The teacher's turns for ``row``: strings, or callables of the last observation (the tool's answer is
    read from the transcript, never computed here). ``bad``: a first call that fails (``BAD_CALLS``)."""
    first = call(row["a"], "*", row["b"])
    turns: list = []
    if bad == "unknown_tool":
        turns.append(call(row["a"], "*", row["b"], name="calculator"))
    elif bad == "bad_json":
        turns.append(first.replace("}}", "}", 1))
    elif bad is not None:
        raise ValueError(f"unknown bad call {bad!r}; valid: {BAD_CALLS}")
    return [*turns, first, lambda obs: call(obs, row["op"], row["c"]), lambda obs: obs]


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
    from opd.agents.env import EnvSpec
    from opd.agents.runner import EpisodeRunner, open_episode

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
