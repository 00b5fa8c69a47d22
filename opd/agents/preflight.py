"""The ``agent`` section checked on the driver before Ray starts: the environment can be made, every prompt
still leaves room for a turn once the environment has framed it (a tool list in the system prompt), and the
chat template can continue an episode after a tool's result."""

from __future__ import annotations

import logging

from opd.agents import episode_setup
from opd.agents.calls import renders_tools
from opd.agents.ledger import TemplateDrift, Transcript
from opd.agents.runner import open_episode
from opd.errors import ConfigError
from opd.types import Prompt

logger = logging.getLogger(__name__)


def check_episodes(cfg, tok, prompts: list[Prompt]) -> None:
    setup = episode_setup(cfg)
    if setup is None:
        return
    spec, limits = setup
    key = "agent.tools" if spec.environment == "tools" else "agent.environment"
    try:
        native = renders_tools(tok)
        env = spec.make(describe_tools=not native)
    except Exception as e:  # a user's factory may raise anything; the run would raise it in every worker
        raise ConfigError(f"{key}: {e}") from None
    try:
        if prompts:
            # the built-in answers as the tool role; a user environment picks its own, so only the template's
            # prefix stability is probed there (with a user message, which every template renders)
            role = "tool" if spec.environment == "tools" else "user"
            _check_template(tok, _framed(tok, env, key, prompts[0], native), role)
        _check_lengths(cfg, limits, lambda p: len(_framed(tok, env, key, p, native).prompt_ids()), prompts)
    finally:
        env.close()


def _framed(tok, env, key: str, p: Prompt, native: bool) -> Transcript:
    try:
        return open_episode(tok, env, p, 0, native)
    except Exception as e:
        raise ConfigError(f"{key}: the environment's reset failed on row {p.prompt_id}: {e}") from None


def _check_lengths(cfg, limits, framed_len, prompts: list[Prompt]) -> None:
    """Rendering every row as an episode costs seconds on a large set: what framing adds is measured on a
    spread of rows, and only rows that could then be too long are rendered. A row framed longer than any of
    the spread (an environment whose prompt varies a lot) still runs: its episode stops ``context_full``."""
    room = limits.max_model_len - limits.max_turn_tokens
    spread = prompts[:: max(1, len(prompts) // 32)]
    extra = max((framed_len(p) - len(p.token_ids) for p in spread), default=0)
    too_long = []
    for p in (p for p in prompts if len(p.token_ids) + extra > room):
        n = framed_len(p)
        if n <= room:
            continue
        if cfg.task.too_long == "fail":
            raise ConfigError(f"rollout.max_model_len={limits.max_model_len}: row {p.prompt_id} framed as an "
                              f"episode (the environment's system prompt included) is {n} tokens, leaving no "
                              f"room for a {limits.max_turn_tokens}-token turn; raise it or shorten the "
                              "prompts")
        too_long.append(p.prompt_id)
    if too_long and len(too_long) == len(prompts):
        raise ConfigError(f"rollout.max_model_len={limits.max_model_len}: every prompt framed as an episode "
                          f"leaves no room for a {limits.max_turn_tokens}-token turn (first: {too_long[0]})")
    if too_long:
        logger.warning("%d of %d prompts framed as episodes leave no room for a turn; their episodes stop "
                       "context_full (first: %s)", len(too_long), len(prompts), too_long[0])


def _check_template(tok, transcript: Transcript, role: str) -> None:
    """One turn and one observation (as ``role``) through the template: it must render the role and keep
    the history a prefix of the next rendering (token-in-token-out needs both)."""
    end = [tok.eos_token_id] if tok.eos_token_id is not None else []
    try:
        transcript.add_turn(tok("ok", add_special_tokens=False)["input_ids"] + end)
        transcript.observe([{"role": role, "content": "1"}])
    except TemplateDrift as e:
        raise ConfigError(f"models.chat_template cannot continue an episode: {e}") from None
    except Exception as e:  # jinja's own errors (a template that raises on an unknown role)
        raise ConfigError(f"models.chat_template cannot render a tool result: {e}") from None
