"""Prompt source: dataset rows rendered with the student's chat template, served in seeded epochs.

The cursor (epoch, position) is all the state there is, so a checkpoint restores the exact next batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from opd.types import Prompt


def load_tokenizer(model_dir: str, template: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if template is not None:
        tok.chat_template = chat_template_text(template)
    return tok


def chat_template_text(value: str) -> str:
    """``models.chat_template``: a path to a Jinja file, or the template itself."""
    path = Path(value).expanduser()
    return path.read_text() if value.endswith((".jinja", ".j2", ".txt")) and path.is_file() else value


def prompt_messages(row: dict) -> list[dict]:
    """The chat a row's prompt is rendered from (``Prompt.columns`` is the row): with the student's template
    here, with its own by a teacher of another tokenizer."""
    return [{"role": "user", "content": row["prompt"]}]


def render_prompts(rows: list[dict], tokenizer, split: str) -> list[Prompt]:
    prompts = []
    for i, row in enumerate(rows):
        text = tokenizer.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(Prompt(prompt_id=f"{split}-{i}", text=text, token_ids=ids, answer=row["answer"],
                              columns=dict(row)))
    return prompts


@dataclass
class Cursor:
    epoch: int = 0
    position: int = 0


class PromptSource:
    """Each epoch visits every prompt once in a seeded order; batches may straddle epochs."""

    def __init__(self, prompts: list[Prompt], seed: int, cursor: Cursor | None = None):
        if not prompts:
            raise ValueError("the training split is empty")
        self.prompts = prompts
        self.seed = seed
        self.cursor = cursor or Cursor()

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[tuple[Prompt, int]]:
        """The next ``n`` prompts, each with the epoch it is drawn in (part of its samples' ids)."""
        batch = []
        order = self._order(self.cursor.epoch)
        while len(batch) < n:
            if self.cursor.position >= len(order):
                self.cursor = Cursor(self.cursor.epoch + 1, 0)
                order = self._order(self.cursor.epoch)
            batch.append((self.prompts[order[self.cursor.position]], self.cursor.epoch))
            self.cursor.position += 1
        return batch
