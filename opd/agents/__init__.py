"""Multi-turn tool-using episodes: environments (``env``), tools (``tools``, ``calls``), one token ledger per
episode (``ledger``), the runner that plays them on a rollout engine (``runner``) and their metrics."""

from __future__ import annotations

from opd.agents.env import EnvSpec
from opd.agents.runner import AgentLimits


def episode_setup(cfg) -> tuple[EnvSpec, AgentLimits] | None:
    """What a rollout worker needs to play episodes for job config ``cfg``; None for a single-turn job."""
    a = cfg.agent
    if a.environment is None:
        return None
    env = EnvSpec(a.environment, tuple(a.tools), dict(a.env_kwargs), a.max_tool_errors, a.max_tool_timeouts)
    limits = AgentLimits(a.max_turns, cfg.rollout.max_new_tokens, a.max_episode_tokens,
                         a.max_observation_tokens, a.episode_timeout_s, cfg.rollout.max_model_len)
    return env, limits
