"""Prompt source: dataset rows rendered with the student's chat template, served in seeded epochs.

The cursor (epoch, position) is all the state there is, so a checkpoint restores the exact next batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from opd.types import Prompt


def render_prompts(rows: list[dict], tokenizer, split: str) -> list[Prompt]:
    prompts = []
    for i, row in enumerate(rows):
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
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
