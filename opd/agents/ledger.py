"""One token ledger per episode, and the chat template's delta for each environment turn.

The ledger is append-only: the student's turns go in as the exact ids the engine drew (never decoded and
re-encoded), with the sampler's log-probs and the weight version; an environment turn goes in as the ids of
what the chat template adds after the history (the end of the student's turn, the tool message, the next
assistant header), split into ``template`` and ``environment`` segments. The engine continues from
``ids()``, the teacher scores those ids and the learner trains on them; only ``sampled`` ids are in the
loss.

Drift: the delta is only defined when the template renders the history (the first prompt plus each turn's
text) as a prefix of the new rendering. A template that rewrites earlier turns (strips reasoning, drops a
newline at a tool boundary, re-renders a system prompt) is not prefix-stable: ``Transcript.observe`` raises
``TemplateDrift``, and the runner ends the episode with stop reason ``drift`` rather than repairing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Origin = Literal["sampled", "environment", "template"]


@dataclass(frozen=True)
class Segment:
    origin: Origin
    ids: list[int]
    logprobs: list[float] | None = None  # the sampler's, for sampled ids
    version: int | None = None  # the weight version that drew sampled ids


class Ledger:
    def __init__(self, prompt_ids: list[int]):
        self.prompt_ids = list(prompt_ids)
        self.segments: list[Segment] = []

    def append(self, seg: Segment) -> None:
        if seg.ids:
            self.segments.append(seg)

    def response_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.ids]

    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids()

    def __len__(self) -> int:
        return len(self.prompt_ids) + sum(len(s.ids) for s in self.segments)

    def loss_mask(self) -> list[int]:
        return [int(s.origin == "sampled") for s in self.segments for _ in s.ids]

    def sampler_logprobs(self) -> list[float]:
        """Per response token: the sampler's log-prob where it drew the token, 0.0 elsewhere (masked)."""
        return [x for s in self.segments
                for x in (s.logprobs if s.origin == "sampled" else [0.0] * len(s.ids))]

    def spans(self) -> list[tuple[str, int, int]]:
        """(origin, start, end) of each segment over the response ids."""
        out, at = [], 0
        for s in self.segments:
            out.append((s.origin, at, at + len(s.ids)))
            at += len(s.ids)
        return out


class TemplateDrift(ValueError):
    """The chat template does not render the history as a prefix of its next rendering."""


class Transcript:
    """The episode's messages and the text its ledger's ids stand for, rendered by ``tokenizer``'s chat
    template."""

    def __init__(self, tokenizer, messages: list[dict], tools: list[dict] | None = None):
        """``tools``: JSON schemas for a template that renders them (``opd.agents.calls.renders_tools``)."""
        self.tok, self.tools = tokenizer, tools
        self.messages = list(messages)
        self.text = self._render(self.messages)
        self._closed_by = ""  # the special token that ended the last turn, as text

    def _render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                            add_generation_prompt=True)

    def prompt_ids(self) -> list[int]:
        return self.tok(self.text, add_special_tokens=False)["input_ids"]

    def turn_text(self, ids: list[int]) -> str:
        """A turn's text without its closing special token (the message content the template renders)."""
        if ids and ids[-1] in self.tok.all_special_ids:
            ids = ids[:-1]
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add_turn(self, ids: list[int]) -> str:
        content = self.turn_text(ids)
        self.messages.append({"role": "assistant", "content": content})
        self.text += content
        self._closed_by = (self.tok.decode([ids[-1]], skip_special_tokens=False)
                           if ids and ids[-1] in self.tok.all_special_ids else "")
        return content

    def observe(self, observations: list[dict]) -> list[Segment]:
        """The segments that take the transcript from the end of the last turn to the next assistant header,
        with ``observations`` in between; raises ``TemplateDrift`` when the template is not prefix-stable."""
        full = self._render(self.messages + observations)
        if not full.startswith(self.text):
            at = next((i for i, (a, b) in enumerate(zip(full, self.text, strict=False)) if a != b), len(full))
            raise TemplateDrift(f"the chat template re-renders the history differently at character {at}: "
                                f"{self.text[at:at + 40]!r} became {full[at:at + 40]!r}")
        delta = full[len(self.text):]
        if self._closed_by:  # the turn's own end token is in the ledger already, as the student drew it
            if not delta.startswith(self._closed_by):
                raise TemplateDrift(f"the turn ended with {self._closed_by!r}, the template closes it with "
                                    f"{delta[:20]!r}")
            delta = delta[len(self._closed_by):]
        pieces, at = [], 0
        for m in observations:
            content = str(m.get("content", ""))
            found = delta.find(content, at) if content else -1
            if found < 0:
                continue
            pieces += [("template", delta[at:found]), ("environment", content)]
            at = found + len(content)
        pieces.append(("template", delta[at:]))
        self.messages += observations
        self.text = full
        return [Segment(origin, self.tok(text, add_special_tokens=False)["input_ids"])
                for origin, text in pieces if text]

    def cap(self, content: str, max_tokens: int) -> str:
        """An observation cut to ``max_tokens`` tokens (not characters), saying how many were cut."""
        ids = self.tok(content, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return content
        kept = self.tok.decode(ids[:max_tokens], skip_special_tokens=False,
                               clean_up_tokenization_spaces=False)
        return f"{kept}\n[truncated: {len(ids) - max_tokens} more tokens]"
