"""The figures a user of an agent trainer looks for, per step: tool calls, errors and timeouts per episode,
turns, each stop reason's share, ``drift_rate``, and the teacher's KL split by where the tokens sit: the
turns that call a tool, the first tokens after an observation, and the final answer."""

from __future__ import annotations

from opd.agents.env import STOP_REASONS
from opd.types import RolloutBatch, TeacherScores

AFTER_OBSERVATION = 4  # "the first tokens after an observation": this many of the next turn


def episode_metrics(rollouts: RolloutBatch, scores: TeacherScores | None) -> dict[str, float]:
    eps = [s.episode for s in rollouts.samples if s.episode is not None]
    if not eps:
        return {}
    n = len(eps)
    m = {"episode_" + k: sum(getattr(e, k) for e in eps) / n
         for k in ("turns", "tool_calls", "tool_errors", "tool_timeouts")}
    m["drift_rate"] = sum(e.drift for e in eps) / n
    m.update({f"stop_{r}": sum(e.stop == r for e in eps) / n for r in STOP_REASONS})
    if scores is not None:
        m.update(kl_by_segment(rollouts, scores))
    return m


HELD_OUT = ("tool_call_rate", "turns", "tool_errors", "drift_rate")


def held_out_episodes(samples) -> dict[str, float]:
    """Greedy held-out episodes (``HELD_OUT``): the share that called a tool at all, turns, tool errors per
    episode, drift."""
    eps, n = [s.episode for s in samples], len(samples)
    return {"tool_call_rate": sum(e.tool_calls > 0 for e in eps) / n, "turns": sum(e.turns for e in eps) / n,
            "tool_errors": sum(e.tool_errors for e in eps) / n, "drift_rate": sum(e.drift for e in eps) / n}


def episode_figures(held_out: dict[str, float]) -> dict[str, float]:
    """The ``HELD_OUT`` figures among ``opd.steps.held_out``'s ``eval_*`` keys, without the prefix."""
    return {k: held_out[f"eval_{k}"] for k in HELD_OUT if f"eval_{k}" in held_out}


def kl_by_segment(rollouts: RolloutBatch, scores: TeacherScores) -> dict[str, float]:
    sums = {"tool_call": [0.0, 0], "after_observation": [0.0, 0], "answer": [0.0, 0]}
    for s, lp in zip(rollouts.samples, scores.logprobs, strict=True):
        if s.episode is None:
            continue
        spans = s.episode.spans
        for k, (origin, a, b) in enumerate(spans):
            if origin != "sampled":
                continue
            kl = [s.sampler_logprobs[t] - lp[t] for t in range(a, b)]
            last = all(o != "sampled" for o, _, _ in spans[k + 1:])
            where = "answer" if last and s.episode.stop == "answered" else "tool_call" if not last else None
            if where:
                sums[where][0] += sum(kl)
                sums[where][1] += len(kl)
            if k and spans[k - 1][0] != "sampled":
                head = kl[:AFTER_OBSERVATION]
                sums["after_observation"][0] += sum(head)
                sums["after_observation"][1] += len(head)
    return {f"teacher_kl_{k}": v / c for k, (v, c) in sums.items() if c}
