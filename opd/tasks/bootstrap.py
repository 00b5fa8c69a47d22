"""Train the teacher and the starting student from scratch, offline, on a CPU.

On-policy distillation needs a teacher that solves the task and a student that does not yet: the gap between
them is what the service closes. No model hub is reachable, so both are tiny Qwen2 models (the architecture
vLLM serves) trained here by plain supervised fine-tuning. Everything is driven by step counts, seeds and
checks on fixed rows, never by wall-clock budgets, so a spec gives the same checkpoints however busy the
machine is. The result is cached under ``out_dir`` keyed by a hash of the spec, because the demo calls this on
every start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from opd.models.store import building, write_stamp
from opd.tasks.arithmetic import build_dataset, exact_answer
from opd.tasks.tokenizer import build_tokenizer

log = logging.getLogger("opd.bootstrap")

RECIPE_VERSION = 2  # bump when training changes in a way the spec does not show, so old caches are rebuilt
IGNORE_INDEX = -100  # label value the HF causal-LM loss skips
ROLES = ("teacher", "student")


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class SFTSpec:
    """Step-driven schedule; ``stop_at_accuracy`` ends it at the first validation check that reaches the
    value.

    Stopping on measured accuracy rather than at a fixed step is what lands the student reliably in its "weak
    but not zero" band: exact-match accuracy on addition jumps within a few hundred steps, and where that
    happens moves with the seed and with the machine's floating-point rounding. It stays deterministic (greedy
    decode, fixed rows).
    For the same reason a target can still be unmet when the schedule ends (the demo teacher, seed 0, on one
    CPU: 85 % after 3,000 steps, the jump under way): ``extend_steps`` more run at the schedule's final rate,
    and only while the target is unmet, so a run that meets it within ``steps`` is unchanged.
    """

    steps: int  # the cosine schedule's length, and the most steps run without a target
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio; 1.0 = constant after warmup
    eval_every: int = 0  # validation check period in steps; 0 = never
    stop_at_accuracy: float | None = None
    extend_steps: int = 0  # steps past ``steps``, at the final rate, while ``stop_at_accuracy`` is unmet

    def most_steps(self, validating: bool) -> int:
        """Extension steps run only where a target is checked: without one they would only train past the
        schedule."""
        return self.steps + (self.extend_steps if validating and self.stop_at_accuracy is not None else 0)


@dataclass(frozen=True)
class TaskSpec:
    """``build_dataset`` arguments; the last ``num_val`` train rows are kept out of training for the stop
    checks."""

    num_train: int = 40000
    num_test: int = 500
    num_val: int = 500
    max_digits_a: int = 3
    max_digits_b: int = 2
    ops: tuple[str, ...] = ("+",)
    seed: int = 0


@dataclass(frozen=True)
class BootstrapSpec:
    task: TaskSpec
    teacher: ModelSpec
    student: ModelSpec
    teacher_sft: SFTSpec
    student_sft: SFTSpec
    seed: int = 0
    eval_batch_size: int = 250

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> BootstrapSpec:
        """Inverse of ``to_dict``, e.g. for the ``spec`` stored in bootstrap.json."""
        parts = {"teacher": ModelSpec, "student": ModelSpec, "teacher_sft": SFTSpec, "student_sft": SFTSpec}
        task = {**d["task"], "ops": tuple(d["task"].get("ops", ("+",)))}
        rest = {k: v for k, v in d.items() if k not in parts and k != "task"}
        return cls(task=TaskSpec(**task), **{k: t(**d[k]) for k, t in parts.items()}, **rest)

    def hash(self) -> str:
        return spec_hash(RECIPE_VERSION, self.to_dict())


def spec_hash(recipe: int, spec: dict) -> str:
    """The cache key of a bootstrap: its recipe version and every field of its spec."""
    payload = json.dumps({"recipe": recipe, "spec": spec}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def demo_spec() -> BootstrapSpec:
    """~1M-parameter teacher near 100 %; ~0.2M student stopped on its way up, at a weak but non-zero
    accuracy."""
    return BootstrapSpec(
        task=TaskSpec(num_train=40000, num_test=500, num_val=500, max_digits_a=3, max_digits_b=2),
        teacher=ModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512),
        student=ModelSpec(hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=256),
        teacher_sft=SFTSpec(steps=3000, batch_size=64, lr=3e-3, eval_every=100, stop_at_accuracy=0.995,
                            extend_steps=3000),
        student_sft=SFTSpec(steps=3000, batch_size=64, lr=2e-3, min_lr_ratio=1.0, eval_every=20,
                            stop_at_accuracy=0.15),
    )


def tiny_spec() -> BootstrapSpec:
    """The demo's code path in seconds, for tests: accuracy is irrelevant, valid checkpoints are not."""
    return BootstrapSpec(
        task=TaskSpec(num_train=2000, num_test=100, num_val=100, max_digits_a=2, max_digits_b=2),
        teacher=ModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128),
        student=ModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128),
        teacher_sft=SFTSpec(steps=150, warmup_steps=10, eval_every=50),
        student_sft=SFTSpec(steps=50, warmup_steps=10, eval_every=25, stop_at_accuracy=0.5),
        eval_batch_size=100,
    )


def build_model(spec: ModelSpec, tokenizer, max_positions: int = 128) -> Qwen2ForCausalLM:
    head_dim, rem = divmod(spec.hidden_size, spec.num_heads)
    if rem or head_dim not in (32, 64):
        raise ValueError(
            f"head_dim = hidden_size / num_heads must be 32 or 64 (vLLM's CPU attention); got {spec}")
    if spec.num_heads % spec.num_kv_heads:
        raise ValueError(f"num_heads must be a multiple of num_kv_heads; got {spec}")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=max_positions,
        max_window_layers=spec.num_layers,
        tie_word_embeddings=True,
        dtype="float32",
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts the tied embedding once


@contextmanager
def torch_threads(n: int):
    """torch's thread count is process-wide: set it for one stage, then give the caller theirs back."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def render_prompt(tokenizer, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _prompt_renderer(tokenizer):
    """``render_prompt`` as string concatenation: Jinja per row costs more than the training on 50k rows
    does."""
    marker = "\x00PROMPT\x00"
    head, found, tail = render_prompt(tokenizer, marker).partition(marker)
    if not found:  # a template that rewrites its content: render every row
        return lambda p: render_prompt(tokenizer, p)
    return lambda p: head + p + tail


def _rows(rows: Iterable[Mapping]) -> list[Mapping]:
    # iterating a Dataset row by row is slow
    return rows.to_list() if hasattr(rows, "to_list") else list(rows)


def sft_example(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example: only the answer and its end token are learned, the prompt is
    given."""
    return _sft_examples(tokenizer, [{"prompt": prompt, "answer": answer}])[0]


def _sft_examples(tokenizer, rows: list[Mapping]) -> list[tuple[list[int], list[int]]]:
    render = _prompt_renderer(tokenizer)
    prompts = tokenizer([render(r["prompt"]) for r in rows], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id]
    return [(p + a + end, [IGNORE_INDEX] * len(p) + a + end) for p, a in zip(prompts, answers, strict=True)]


def sft_tensors(tokenizer, rows: Iterable[Mapping]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All examples right-padded once into (ids, labels, lengths), so a training step is an index gather."""
    return pad_examples(_sft_examples(tokenizer, _rows(rows)), tokenizer.pad_token_id)


def pad_examples(examples: list[tuple[list[int], list[int]]], pad: int):
    """(input_ids, labels) examples right-padded into (ids, labels, lengths) tensors."""
    width = max(len(x) for x, _ in examples)
    ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in examples])
    labels = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for _, y in examples])
    return ids, labels, torch.tensor([len(x) for x, _ in examples])


def _lr_factor(step: int, spec: SFTSpec) -> float:
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = min(1.0, (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps))
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sft(model, tokenizer, train_rows: Iterable[Mapping], spec: SFTSpec, seed: int = 0, name: str = "model",
        num_threads: int = 2, val_rows: Iterable[Mapping] | None = None) -> dict:
    """AdamW on the response tokens; returns steps run, final smoothed loss, seconds and the validation
    curve."""
    val_rows = _rows(val_rows or [])
    with torch_threads(num_threads):
        return fit(model, sft_tensors(tokenizer, train_rows), spec, seed, name,
                   (lambda m: _evaluate(m, tokenizer, val_rows, 250)) if val_rows else None)


def fit(model, tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], spec: SFTSpec, seed: int = 0,
        name: str = "model", validate: Callable[[torch.nn.Module], float] | None = None) -> dict:
    """The SFT loop on padded (ids, labels, lengths); ``validate(model)`` -> accuracy for the stop checks."""
    start = time.monotonic()
    ids, labels, lengths = tensors
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    order, cursor, loss_avg, curve, step = torch.randperm(len(ids), generator=gen), 0, float("nan"), [], 0
    model.train()
    validating = bool(validate and spec.eval_every)
    most = spec.most_steps(validating)
    while step < most:
        if cursor + spec.batch_size > len(order):  # next epoch, fresh seeded shuffle
            order, cursor = torch.randperm(len(ids), generator=gen), 0
        batch = order[cursor : cursor + spec.batch_size]
        cursor += spec.batch_size
        width = int(lengths[batch].max())
        # Pads sit only at the right end and attention is causal, so no pad can influence a real token:
        # leaving attention_mask out is exact, and keeps SDPA on its fast is_causal path.
        loss = model(input_ids=ids[batch, :width], labels=labels[batch, :width]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        loss_avg = loss.item() if step == 1 else 0.95 * loss_avg + 0.05 * loss.item()
        if step % max(1, spec.steps // 10) == 0:
            log.info("%s sft step %d/%d loss %.4f lr %.2e %.0fs", name, step, most, loss_avg,
                     sched.get_last_lr()[0], time.monotonic() - start)
        if validating and step % spec.eval_every == 0:
            acc = validate(model)
            model.train()
            curve.append([step, acc])
            log.debug("%s step %d validation accuracy %.3f", name, step, acc)
            if spec.stop_at_accuracy is not None and acc >= spec.stop_at_accuracy:
                log.info("%s: validation accuracy %.3f >= %s at step %d: stop", name, acc,
                         spec.stop_at_accuracy, step)
                break
    model.eval()
    return {"steps": step, "final_loss": loss_avg, "seconds": round(time.monotonic() - start, 1),
            "val_accuracy": curve[-1][1] if curve else None, "val_curve": curve}


def evaluate_accuracy(model, tokenizer, rows: Iterable[Mapping], batch_size: int = 250,
                      num_threads: int = 2) -> float:
    """Greedy exact-match accuracy, scored by the same verifier the reward stage uses."""
    with torch_threads(num_threads):
        return _evaluate(model, tokenizer, _rows(rows), batch_size)


@torch.no_grad()
def _evaluate(model, tokenizer, rows: list[Mapping], batch_size: int) -> float:
    if not rows:
        return 0.0
    model.eval()
    render, max_new, scores = _prompt_renderer(tokenizer), max(len(r["answer"]) for r in rows) + 2, []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer([render(r["prompt"]) for r in chunk], padding=True, add_special_tokens=False,
                        padding_side="left", return_tensors="pt")  # generation appends on the right
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        scores += exact_answer([r["prompt"] for r in chunk], completions, answer=[r["answer"] for r in chunk])
    return sum(scores) / len(scores)


def task_splits(task: TaskSpec) -> dict:
    """train / val / test rows; val is the tail of ``build_dataset``'s train split, so test stays
    untouched."""
    t = task
    data = build_dataset(t.num_train, t.num_test, t.max_digits_a, t.max_digits_b, tuple(t.ops), t.seed)
    n_fit = len(data["train"]) - task.num_val
    if n_fit <= 0:
        raise ValueError(
            f"task.num_val ({task.num_val}) must be smaller than task.num_train ({task.num_train})")
    train = data["train"]
    return {"train": train.select(range(n_fit)), "val": train.select(range(n_fit, len(train))),
            "test": data["test"]}


def load_cached(out_dir: Path, spec_hash: str) -> dict | None:
    try:
        meta = json.loads((out_dir / "bootstrap.json").read_text())
        if meta.get("spec_hash") != spec_hash:
            log.info("cache at %s is for spec %s, not %s: rebuilding", out_dir, meta.get("spec_hash"),
                     spec_hash)
            return None
        for role in ROLES:
            AutoTokenizer.from_pretrained(out_dir / role)
            AutoModelForCausalLM.from_pretrained(out_dir / role)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged cache is rebuilt, never trusted
        log.warning("cache at %s does not load (%s): rebuilding", out_dir, exc)
        return None
    return meta


def _train_role(role: str, spec: BootstrapSpec, tokenizer, data: dict, dest: Path, num_threads: int) -> dict:
    seed = spec.seed + ROLES.index(role)
    torch.manual_seed(seed)  # model init
    model = build_model(getattr(spec, role), tokenizer)
    log.info("%s: %d params, %s", role, num_params(model), getattr(spec, role))
    summary = sft(model, tokenizer, data["train"], getattr(spec, f"{role}_sft"), seed=seed, name=role,
                  num_threads=num_threads, val_rows=data["val"])
    t0 = time.monotonic()
    acc = evaluate_accuracy(model, tokenizer, data["test"], spec.eval_batch_size, num_threads=num_threads)
    summary["eval_seconds"] = round(time.monotonic() - t0, 1)
    log.info("%s: held-out accuracy %.3f on %d rows after %d steps (%.0fs)", role, acc, len(data["test"]),
             summary["steps"], summary["seconds"])
    model.save_pretrained(dest / role)
    tokenizer.save_pretrained(dest / role)
    return {"params": num_params(model), "accuracy": acc, **summary}


def bootstrap(out_dir: Path, spec: BootstrapSpec | None = None, force: bool = False,
              num_threads: int = 2) -> dict:
    """Build (or reuse) ``out_dir/{teacher,student}`` and ``out_dir/bootstrap.json``; returns the json
    contents.

    ``num_threads`` is not part of the spec hash: it changes speed, and otherwise only float rounding.
    """
    out_dir, spec = Path(out_dir), spec or demo_spec()
    spec_hash = spec.hash()
    if not force and (cached := load_cached(out_dir, spec_hash)) is not None:
        log.info("bootstrap cache hit at %s (spec %s)", out_dir, spec_hash)
        return cached
    if out_dir.exists() and (stray := set(os.listdir(out_dir)) - {*ROLES, "bootstrap.json"}):
        raise FileExistsError(
            f"{out_dir} holds files bootstrap did not write ({sorted(stray)}); not replacing it")
    start = time.monotonic()
    with building(out_dir) as tmp:
        data = task_splits(spec.task)
        log.info("bootstrap %s into %s: %s rows", spec_hash, out_dir, {k: len(v) for k, v in data.items()})
        tokenizer = build_tokenizer()
        meta: dict = {"spec": spec.to_dict(), "spec_hash": spec_hash, "recipe_version": RECIPE_VERSION}
        for role in ROLES:
            meta[role] = _train_role(role, spec, tokenizer, data, tmp, num_threads)
            meta[f"{role}_accuracy"] = meta[role]["accuracy"]
        meta["seconds"] = round(time.monotonic() - start, 1)
        meta = write_stamp(tmp, "bootstrap.json", meta)
    log.info("bootstrap done in %.0fs: teacher %.3f (%d params), student %.3f (%d params)", meta["seconds"],
             meta["teacher_accuracy"], meta["teacher"]["params"], meta["student_accuracy"],
             meta["student"]["params"])
    return meta
