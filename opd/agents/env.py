"""The ``Environment`` protocol (one instance per episode) and the built-in tool environment.

An environment turns a dataset row into the first messages, offers tools, and answers each student turn with
observations (messages, usually ``role: tool``), a reward, and whether the episode is over and why. The
runner (``opd.agents.runner``) owns the tokens: an environment only ever sees and returns text.

User environments plug in by path, as verifiers do (``agent.environment: pkg.module:MyEnv`` or
``path/to/env.py:MyEnv``; a class or factory called with ``agent.env_kwargs``); plain tool functions by path
too (``agent.tools``), given to the built-in ``ToolEnvironment``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from opd.agents.calls import parse_turn, system_prompt
from opd.agents.tools import BUILTIN_TOOLS, Tool

# Why an episode ended. Every reason keeps the episode as a sample (none is dropped) whose sampled tokens
# are trained; the reward is the verifiers' score of its last assistant turn plus the environment's rewards
# (docs/episodes.md states each reason's rule).
StopReason = Literal["answered", "max_turns", "length", "context_full", "tool_timeout", "parse_error",
                     "timeout", "drift"]
STOP_REASONS: tuple[str, ...] = StopReason.__args__


@dataclass
class EnvStep:
    observations: list[dict] = field(default_factory=list)  # chat messages appended after the turn
    reward: float = 0.0
    done: bool = False
    stop: StopReason | None = None  # set when done
    tool_calls: int = 0
    tool_errors: int = 0  # malformed calls, unknown tools, bad arguments, tools that raised
    tool_timeouts: int = 0


class Environment(Protocol):
    tools: list[Tool]

    def reset(self, row: dict, seed: int) -> list[dict]:
        """The episode's first messages for dataset ``row`` (its columns, ``prompt`` and ``answer``)."""
        ...

    def step(self, turn: str) -> EnvStep:
        """Answer the student's turn (its text, tool calls included)."""
        ...

    def close(self) -> None: ...


class ToolEnvironment:
    """The row's prompt as the user message, the tools described in a system message; a turn without a tool
    call is the answer. Errors come back as observations; ``max_tool_errors`` errors in a row end the episode
    (``parse_error``), as do ``max_tool_timeouts`` timed-out calls (``tool_timeout``)."""

    def __init__(self, tools: list[Tool], max_tool_errors: int = 3, max_tool_timeouts: int = 2,
                 describe: bool = True):
        if not tools:
            raise ValueError("a tool environment needs at least one tool")
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        self.tools, self.by_name = tools, {t.name: t for t in tools}
        self.max_tool_errors, self.max_tool_timeouts = max_tool_errors, max_tool_timeouts
        self.errors_in_a_row = self.timeouts = 0
        self.describe = describe  # False: the chat template renders the tools (calls.renders_tools)

    def reset(self, row: dict, seed: int) -> list[dict]:
        self.errors_in_a_row = self.timeouts = 0
        user = [{"role": "user", "content": str(row["prompt"])}]
        if not self.describe:
            return user
        return [{"role": "system", "content": system_prompt([t.schema for t in self.tools])}, *user]

    def step(self, turn: str) -> EnvStep:
        parsed = parse_turn(turn)
        if not parsed.called:
            return EnvStep(done=True, stop="answered")
        out = EnvStep(tool_calls=len(parsed.calls) + len(parsed.errors), tool_errors=len(parsed.errors))
        texts = list(parsed.errors)
        for call in parsed.calls:
            tool = self.by_name.get(call.name)
            if tool is None:
                texts.append(f"error: unknown tool {call.name!r}; tools: {sorted(self.by_name)}")
                out.tool_errors += 1
                continue
            r = tool.call(call.arguments)
            texts.append(r.text)
            out.tool_errors += r.status == "error"
            out.tool_timeouts += r.status == "timeout"
        out.observations = [{"role": "tool", "content": t} for t in texts]
        self.errors_in_a_row = self.errors_in_a_row + 1 if out.tool_errors else 0
        self.timeouts += out.tool_timeouts
        if self.timeouts >= self.max_tool_timeouts:
            out.done, out.stop = True, "tool_timeout"
        elif self.errors_in_a_row >= self.max_tool_errors:
            out.done, out.stop = True, "parse_error"
        return out

    def close(self) -> None:
        pass


def _by_path(spec: str, what: str):
    """The object ``spec`` names ('package.module:name' / 'path/to/file.py:name'), loaded as verifiers are;
    the loader's errors name ``what`` it is."""
    from opd.rewards.registry import VerifierSpecError, resolve

    try:
        return resolve(spec)
    except VerifierSpecError as e:
        raise ValueError(str(e).replace("verifier spec", what)) from e


def resolve_tools(specs: list[str]) -> list[Tool]:
    """``agent.tools``: built-in names (``calc``, ``python``) or plain functions by path."""
    tools = []
    for spec in specs:
        if spec in BUILTIN_TOOLS:
            tools.append(Tool.from_function(BUILTIN_TOOLS[spec]))
            continue
        fn = _by_path(spec, "tool") if ":" in spec else None
        if fn is None:
            raise ValueError(f"unknown tool {spec!r}: built-ins are {sorted(BUILTIN_TOOLS)}, or name a "
                             "function as 'package.module:function' / 'path/to/file.py:function'")
        tools.append(Tool.from_function(fn))
    return tools


@dataclass(frozen=True)
class EnvSpec:
    """How each episode's environment is made (the ``agent`` config section's environment keys)."""

    environment: str = "tools"  # "tools": ToolEnvironment over ``tools``; else a class/factory by path
    tools: tuple[str, ...] = ("calc",)
    env_kwargs: dict = field(default_factory=dict)
    max_tool_errors: int = 3
    max_tool_timeouts: int = 2

    def make(self, describe_tools: bool = True) -> Environment:
        """``describe_tools``: the built-in environment describes its tools in a system message (False when
        the chat template renders them)."""
        if self.environment == "tools":
            return ToolEnvironment(resolve_tools(list(self.tools)), self.max_tool_errors,
                                   self.max_tool_timeouts, describe_tools)
        env = _by_path(self.environment, "environment")(**self.env_kwargs)
        missing = [m for m in ("reset", "step", "close") if not callable(getattr(env, m, None))]
        if missing or not isinstance(getattr(env, "tools", None), list):
            raise ValueError(f"environment {self.environment!r}: {type(env).__name__} lacks "
                             f"{missing or ['a tools list']} (opd.agents.env.Environment)")
        return env
