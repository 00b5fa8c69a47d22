"""The tool task's pair (``opd bootstrap --preset tools``): a teacher that calls ``calc`` and a student that
never has.

The teacher learns from scripted episodes (``opd.agents.scripted``: the live runner's own ledger, so the
loss covers exactly the tokens a policy samples, never the tool's output or the template's). The student
learns the same rows' answers without any call, as a model that was never taught tools would answer; both
share the tool vocabulary (``build_tokenizer(tools=True)``). Accuracies are of greedy episodes with the tool
offered, the same measure the distillation job's evaluation uses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from opd.models.store import building, write_stamp
from opd.tasks.bootstrap import (
    IGNORE_INDEX,
    ROLES,
    ModelSpec,
    SFTSpec,
    build_model,
    fit,
    load_cached,
    num_params,
    pad_examples,
    spec_hash,
    torch_threads,
)
from opd.tasks.tokenizer import build_tokenizer

log = logging.getLogger("opd.bootstrap")

RECIPE_VERSION = 1


@dataclass(frozen=True)
class ToolTaskSpec:
    num_train: int = 12000
    num_test: int = 500
    num_val: int = 200
    max_digits_a: int = 3
    max_digits_b: int = 2
    seed: int = 0
    bad_share: float = 0.1  # teacher transcripts that open with a failing call and recover


@dataclass(frozen=True)
class ToolBootstrapSpec:
    task: ToolTaskSpec = field(default_factory=ToolTaskSpec)
    teacher: ModelSpec = ModelSpec(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=256)
    student: ModelSpec = ModelSpec(hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=1,
                                   intermediate_size=256)
    # Episodes are ~65 tokens (~190 with a failed call and its error): a step costs what a few of the
    # arithmetic demo's do, so the teacher is small (copying needs attention, not width) and stops as soon as
    # its greedy episodes are right.
    teacher_sft: SFTSpec = SFTSpec(steps=1200, batch_size=64, lr=3e-3, eval_every=300, stop_at_accuracy=0.98,
                                   extend_steps=600)
    student_sft: SFTSpec = SFTSpec(steps=400, batch_size=64, lr=2e-3)
    max_positions: int = 256
    seed: int = 0

    def hash(self) -> str:
        return spec_hash(RECIPE_VERSION, asdict(self))


def limits(spec: ToolBootstrapSpec):
    """The episode limits of ``configs/tools.yaml`` (its agent and rollout keys), used to script and to
    evaluate."""
    from opd.agents.runner import AgentLimits

    return AgentLimits(max_turns=5, max_turn_tokens=24, max_episode_tokens=224, max_observation_tokens=96,
                       episode_timeout_s=60.0, max_model_len=spec.max_positions)


def script_limits(spec: ToolBootstrapSpec):
    """``limits`` with room for a scripted misnamed call (its name is spelled out, not one merged piece)."""
    return replace(limits(spec), max_turn_tokens=64)


def greedy_answer(model, tok, batch_size: int = 250):
    """``answer(ids_list, max_tokens) -> texts`` of ``model`` decoding greedily (``opd.agents.teacher``)."""

    @torch.no_grad()
    def answer(ids_list: list[list[int]], max_tokens: int) -> list[str]:
        texts = []
        for i in range(0, len(ids_list), batch_size):
            chunk = ids_list[i:i + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            for row in out[:, width:].tolist():
                row = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
                texts.append(tok.decode(row, skip_special_tokens=False))
        return texts

    return answer


def episode_accuracy(model, tok, rows: list[dict], spec: ToolBootstrapSpec) -> dict:
    """Greedy episodes with ``calc`` offered: accuracy, and the figures a job's held-out evaluation reports
    (``opd.agents.metrics.held_out_episodes``: tool-call rate, turns, tool errors, drift)."""
    from opd.agents.env import EnvSpec
    from opd.agents.metrics import held_out_episodes
    from opd.agents.scripted import episode_prompt
    from opd.agents.teacher import greedy_episodes
    from opd.rewards.builtins import exact_answer

    model.eval()
    lim = limits(spec)
    prompts = [episode_prompt(r, i) for i, r in enumerate(rows)]
    samples = greedy_episodes(greedy_answer(model, tok), prompts, (EnvSpec("tools", ("calc",)), lim), tok,
                              lim.max_turn_tokens)
    scores = exact_answer([p.text for p in prompts], [s.response_text for s in samples],
                          answer=[p.answer for p in prompts])
    return {"accuracy": sum(scores) / len(samples), **held_out_episodes(samples)}


def _answer_examples(tok, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """The student's rows: the answer straight after the prompt, rendered with the tool offered (as the agent
    job shows it) and without (as an answers-only job does), alternately."""
    tools = [{"type": "function", "function": {"name": "calc"}}]
    out = []
    for i, r in enumerate(rows):
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                       tools=tools if i % 2 else None, tokenize=False,
                                       add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p + a, [IGNORE_INDEX] * len(p) + a))
    return out


def _teacher_examples(tok, rows: list[dict], spec: ToolBootstrapSpec) -> list[tuple[list[int], list[int]]]:
    from opd.agents.scripted import transcripts

    return [(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])
            for ids, mask in transcripts(tok, rows, spec.task.bad_share, spec.seed, script_limits(spec))]


def bootstrap_tools(out_dir, spec: ToolBootstrapSpec | None = None, force: bool = False,
                    num_threads: int = 2) -> dict:
    """Build (or reuse) ``out_dir/{teacher,student}`` and ``out_dir/bootstrap.json``."""
    from pathlib import Path

    from opd.tasks.tool_chains import build_dataset

    out_dir, spec = Path(out_dir), spec or ToolBootstrapSpec()
    if not force and (cached := load_cached(out_dir, spec.hash())) is not None:
        return cached
    start, t = time.monotonic(), spec.task
    data = build_dataset(t.num_train + t.num_val, t.num_test, t.max_digits_a, t.max_digits_b, t.seed)
    train = data["train"].to_list()
    train, val, test = train[:t.num_train], train[t.num_train:], data["test"].to_list()
    tok = build_tokenizer(tools=True)
    meta: dict = {"spec": asdict(spec), "spec_hash": spec.hash(), "recipe_version": RECIPE_VERSION}
    with building(out_dir) as tmp, torch_threads(num_threads):
        for i, role in enumerate(ROLES):
            torch.manual_seed(spec.seed + i)
            model = build_model(getattr(spec, role), tok, spec.max_positions)
            teacher = role == "teacher"
            examples = _teacher_examples(tok, train, spec) if teacher else _answer_examples(tok, train)
            validate = (lambda m: episode_accuracy(m, tok, val, spec)["accuracy"]) if teacher else None
            summary = fit(model, pad_examples(examples, tok.pad_token_id), getattr(spec, f"{role}_sft"),
                          spec.seed + i, role, validate)
            held_out = episode_accuracy(model, tok, test, spec)
            log.info("%s: %s on %d held-out rows after %d steps", role, held_out, len(test), summary["steps"])
            model.save_pretrained(tmp / role)
            tok.save_pretrained(tmp / role)
            meta[role] = {"params": num_params(model), **held_out, **summary}
            meta[f"{role}_accuracy"] = held_out["accuracy"]
        meta["seconds"] = round(time.monotonic() - start, 1)
        meta = write_stamp(tmp, "bootstrap.json", meta)
    return meta
