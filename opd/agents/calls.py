"""Tool calls in a model's turn: the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` convention
(Hermes/Qwen style, the format the chat templates of most tool-trained models render).

Parsing never raises: a call that is cut off, not JSON, or not an object with a ``name`` is an error the
environment hands back to the model as an observation, and the episode goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: object


@dataclass(frozen=True)
class ParsedTurn:
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one per malformed call, as the model will read it

    @property
    def called(self) -> bool:
        return bool(self.calls or self.errors)


def parse_turn(text: str) -> ParsedTurn:
    calls, errors = [], []
    at = text.find(OPEN)
    while at >= 0:
        end = text.find(CLOSE, at)
        body = text[at + len(OPEN): end if end >= 0 else len(text)].strip()
        if end < 0:
            errors.append(f"error: tool call not closed with {CLOSE}")
            break
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            errors.append(f"error: tool call is not valid JSON ({e.msg} at column {e.colno})")
        else:
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                calls.append(ToolCall(obj["name"], obj.get("arguments", {})))
            else:
                errors.append('error: a tool call is a JSON object {"name": ..., "arguments": {...}}')
        at = text.find(OPEN, end + len(CLOSE))
    return ParsedTurn(calls, errors)


def renders_tools(tokenizer) -> bool:
    """Whether the chat template renders a ``tools=`` list itself (Qwen2.5's, Llama 3.1's, Hermes'): then the
    model reads its tools as it was trained to, and ``system_prompt`` is not added."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = [{"role": "user", "content": "x"}]
    schema = {"type": "function", "function": {"name": "probe_tool", "description": "d",
                                               "parameters": {"type": "object", "properties": {}}}}
    try:
        with_tools = tokenizer.apply_chat_template(probe, tools=[schema], tokenize=False)
    except Exception:  # a template that raises on tools renders none
        return False
    return "probe_tool" in with_tools


def system_prompt(schemas: list[dict]) -> str:
    """The tool convention for a model whose chat template renders no tools (SmolLM2's, the demo's)."""
    lines = "\n".join(json.dumps(s["function"], separators=(",", ":")) for s in schemas)
    return ("You can call tools. To call one, write "
            f'{OPEN}{{"name": NAME, "arguments": {{...}}}}{CLOSE} and wait for its result. '
            f"Tools:\n{lines}\nWhen you know the answer, write it without a tool call.")
