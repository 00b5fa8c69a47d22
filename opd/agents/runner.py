"""Multi-turn episodes on a rollout engine: token in, token out.

All live episodes of a call advance in lock step: one engine call samples every live episode's next turn from
its ledger's exact ids, then each environment answers, and its observation is appended as the chat
template's delta. A turn is cut right after its first complete tool call (the ids after ``</tool_call>`` were
never part of the episode); the engine is the same ``generate`` the single-turn rollout uses, so vLLM and
the HF engine both run episodes.

Limits (``AgentLimits``) and the stop reason each gives: no tool call in a turn -> ``answered``; a turn cut
at ``max_turn_tokens`` -> ``length``; ``max_turns`` turns -> ``max_turns``; the next observation or turn
would pass ``max_model_len`` or ``max_episode_tokens`` -> ``context_full`` (the observation is not
appended); ``episode_timeout_s`` of wall clock -> ``timeout``; the environment's own (``tool_timeout``,
``parse_error``); a template that is not prefix-stable -> ``drift``. Every episode becomes a sample.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field, replace

from opd.agents.calls import CLOSE, renders_tools
from opd.agents.env import Environment, EnvSpec
from opd.agents.ledger import Ledger, Segment, TemplateDrift, Transcript
from opd.types import Episode, Prompt, Sample, ids_digest, sample_uid


@dataclass(frozen=True)
class AgentLimits:
    max_turns: int = 4
    max_turn_tokens: int = 64
    max_episode_tokens: int = 256  # every response token: sampled, environment and template
    max_observation_tokens: int = 64
    episode_timeout_s: float = 60.0
    max_model_len: int = 512


@dataclass
class _Live:
    prompt: Prompt
    epoch: int
    g: int
    env: Environment
    transcript: Transcript
    ledger: Ledger
    started: float
    info: dict = field(default_factory=lambda: {"turns": 0, "tool_calls": 0, "tool_errors": 0,
                                                 "tool_timeouts": 0, "env_reward": 0.0})
    last_turn: str = ""
    stop: str | None = None


def cut_at_call(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` up to the token that completes the first ``</tool_call>`` (all of them when there is none),
    and the end-of-turn token when the policy drew it right there: then closing the turn is trained too."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if CLOSE not in text:
        return ids
    for n in range(1, len(ids) + 1):
        if CLOSE in tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False):
            return ids[: n + 1] if n < len(ids) and ids[n] in tokenizer.all_special_ids else ids[:n]
    return ids


def episode_row(prompt: Prompt) -> dict:
    """The dataset row an environment's ``reset`` sees: its columns, the prompt and the answer."""
    return {**prompt.columns, "prompt": prompt.columns.get("prompt", prompt.text), "answer": prompt.answer}


def open_episode(tok, env: Environment, prompt: Prompt, seed: int, native_tools: bool) -> Transcript:
    """The episode's first transcript: the environment's first messages, its tools rendered by the chat
    template when ``native_tools`` (else the environment describes them itself)."""
    tools = [t.schema for t in env.tools] if native_tools and env.tools else None
    return Transcript(tok, env.reset(episode_row(prompt), seed), tools)


class EpisodeRunner:
    def __init__(self, engine, tokenizer, env_spec: EnvSpec, limits: AgentLimits):
        self.engine, self.tok, self.env_spec, self.limits = engine, tokenizer, env_spec, limits
        self.native_tools = renders_tools(tokenizer)

    def run(self, draws: list[tuple[Prompt, int]], *, n: int, temperature: float, top_p: float, seed: int,
            version: int) -> list[Sample]:
        """``n`` episodes per (prompt, epoch), in order, as samples (``Sample.episode`` set)."""
        live = [self._start(p, e, g, seed) for p, e in draws for g in range(n)]
        turn = 0
        while active := [ep for ep in live if ep.stop is None]:
            by_budget: dict[int, list[_Live]] = {}
            for ep in active:
                budget = self._budget(ep)
                if budget <= 0:
                    ep.stop = "context_full"
                else:
                    by_budget.setdefault(budget, []).append(ep)
            for budget, eps in by_budget.items():
                seeds = [zlib.crc32(f"{seed}/{ep.epoch}/{ep.prompt.prompt_id}/{ep.g}/{turn}".encode())
                         for ep in eps]
                outs = self.engine.generate([ep.ledger.ids() for ep in eps], n=1, temperature=temperature,
                                            top_p=top_p, max_tokens=budget, seeds=seeds)
                for ep, gens in zip(eps, outs, strict=True):
                    self._turn(ep, gens[0], version)
            turn += 1
        return [self._sample(ep, version) for ep in live]

    def _start(self, prompt: Prompt, epoch: int, g: int, seed: int) -> _Live:
        env = self.env_spec.make(describe_tools=not self.native_tools)
        env_seed = zlib.crc32(f"{seed}/{epoch}/{prompt.prompt_id}/{g}".encode())
        transcript = open_episode(self.tok, env, prompt, env_seed, self.native_tools)
        ids = transcript.prompt_ids()
        return _Live(replace(prompt, text=transcript.text, token_ids=ids), epoch, g, env, transcript,
                     Ledger(ids), time.monotonic())

    def _budget(self, ep: _Live, grown: int = 0) -> int:
        """Tokens the next turn may have (after ``grown`` more are appended): its own cap, the model length
        and the episode's budget."""
        lim, used = self.limits, len(ep.ledger) + grown
        return min(lim.max_turn_tokens, lim.max_model_len - used,
                   lim.max_episode_tokens - (used - len(ep.ledger.prompt_ids)))

    def _turn(self, ep: _Live, gen, version: int) -> None:
        ids = cut_at_call(self.tok, gen.token_ids)
        ep.ledger.append(Segment("sampled", ids, gen.logprobs[: len(ids)], version))
        ep.info["turns"] += 1
        ep.last_turn = ep.transcript.add_turn(ids)
        if len(ids) == len(gen.token_ids) and gen.finish_reason == "length" and CLOSE not in ep.last_turn:
            ep.stop = "length"
            return
        step = ep.env.step(ep.last_turn)
        for k in ("tool_calls", "tool_errors", "tool_timeouts"):
            ep.info[k] += getattr(step, k)
        ep.info["env_reward"] += step.reward
        if step.done:
            ep.stop = step.stop or "answered"
        elif ep.info["turns"] >= self.limits.max_turns:
            ep.stop = "max_turns"
        elif time.monotonic() - ep.started > self.limits.episode_timeout_s:
            ep.stop = "timeout"
        if ep.stop is not None:
            return
        cap = self.limits.max_observation_tokens
        obs = [{**m, "content": ep.transcript.cap(str(m.get("content", "")), cap)} for m in step.observations]
        try:
            segments = ep.transcript.observe(obs)
        except TemplateDrift:
            ep.stop = "drift"
            return
        if self._budget(ep, sum(len(s.ids) for s in segments)) <= 0:  # no room left for a turn after it
            ep.stop = "context_full"
            return
        for s in segments:
            ep.ledger.append(s)

    def _sample(self, ep: _Live, version: int) -> Sample:
        ep.env.close()
        led = ep.ledger
        return Sample(
            uid=sample_uid(ep.prompt.prompt_id, ep.g, ep.epoch), prompt=ep.prompt, group_index=ep.g,
            response_ids=led.response_ids(), response_text=ep.last_turn,
            sampler_logprobs=led.sampler_logprobs(),
            weight_version=version, finish_reason=ep.stop or "answered", loss_mask=led.loss_mask(),
            episode=Episode(spans=led.spans(), stop=ep.stop or "answered", drift=ep.stop == "drift",
                            digest=ids_digest(led.ids()), **ep.info),
        )
