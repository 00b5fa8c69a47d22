"""A user environment loaded by path (``agent.environment: tests/agent_envs.py:Counting``): every turn gets an
observation, so episodes have environment and template tokens between their turns whatever the model writes.
``role``: the observations' chat role (the tiny models' template has no ``tool`` role); ``answer_after``:
the turn that ends the episode as answered (None: only the limits end it)."""

from __future__ import annotations

from opd.agents.env import EnvStep


class Counting:
    tools: list = []

    def __init__(self, note: str = "Answer in a few words.", role: str = "tool",
                 answer_after: int | None = None, system: bool = True):
        self.note, self.role, self.answer_after, self.system = note, role, answer_after, system
        self.turns = 0

    def reset(self, row: dict, seed: int) -> list[dict]:
        self.turns = 0
        user = [{"role": "user", "content": str(row["prompt"])}]
        return [{"role": "system", "content": "Answer in a few words."}, *user] if self.system else user

    def step(self, turn: str) -> EnvStep:
        self.turns += 1
        if self.answer_after is not None and self.turns >= self.answer_after:
            return EnvStep(reward=0.25, done=True, stop="answered")
        return EnvStep(observations=[{"role": self.role, "content": f"{len(turn)} characters. {self.note}"}],
                       reward=0.25)

    def close(self) -> None:
        pass
