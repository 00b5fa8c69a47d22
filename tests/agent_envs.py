"""A user environment loaded by path (``agent.environment: tests/agent_envs.py:Counting``): every turn gets an
observation, so each episode runs to ``agent.max_turns`` with environment and template tokens between its
turns, whatever the model writes."""

from __future__ import annotations

from opd.agents.env import EnvStep


class Counting:
    tools: list = []

    def __init__(self, note: str = "Answer in a few words."):
        self.note, self.turns = note, 0

    def reset(self, row: dict, seed: int) -> list[dict]:
        self.turns = 0
        return [{"role": "system", "content": "Answer in a few words."},
                {"role": "user", "content": str(row["prompt"])}]

    def step(self, turn: str) -> EnvStep:
        self.turns += 1
        return EnvStep(observations=[{"role": "tool", "content": f"{len(turn)} characters. {self.note}"}],
                       reward=0.25)

    def close(self) -> None:
        pass
