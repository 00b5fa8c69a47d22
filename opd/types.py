"""Typed records that cross role boundaries (rollout -> verifier/teacher -> router -> learner).

Shapes are ragged per sample (lists of ints/floats), padded only inside the learner. Every record has a
``validate()`` that checks the ragged lengths line up, so a misaligned teacher or sampler shows up as an error
at the boundary where it happened rather than as a silently wrong loss.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Protocol


def ids_digest(ids: list[int]) -> str:
    """A short hash of a token sequence: an episode ledger's, the teacher's input and the learner's input are
    compared by it."""
    return hashlib.blake2b(",".join(map(str, ids)).encode(), digest_size=8).hexdigest()


class RecordError(ValueError):
    """A record whose fields do not line up (names the record, the sample uid and the field)."""


def sample_uid(prompt_id: str, sample_index: int, epoch: int) -> str:
    """Stable id of one sampled answer: prompt, data epoch and sample slot. An epoch visits each prompt once,
    so the id is unique in a run even when a batch straddles two epochs and holds the same prompt twice."""
    return f"{prompt_id}/e{epoch}/g{sample_index}"


@dataclass(frozen=True)
class Prompt:
    """One dataset row turned into model input."""

    prompt_id: str
    text: str  # the rendered chat prompt, exactly as tokenised
    token_ids: list[int]
    answer: str  # ground truth handed to verifiers
    columns: dict = field(default_factory=dict)  # extra dataset columns for TRL-style reward functions


@dataclass
class Generation:
    """One completion from a rollout engine (vLLM, HF) or a teacher answering greedily."""

    token_ids: list[int]
    logprobs: list[float]  # sampler log-prob of each drawn token
    text: str
    finish_reason: str


@dataclass
class Episode:
    """What a multi-turn episode was (``opd.agents``): its ledger's segments over the response ids, how it
    went, why it ended, and a digest of its exact ids (prompt + response) to compare with the teacher's and
    the learner's input."""

    spans: list[tuple[str, int, int]]  # (origin: sampled | environment | template, start, end)
    stop: str  # opd.agents.env.StopReason
    turns: int
    tool_calls: int
    tool_errors: int
    tool_timeouts: int
    env_reward: float
    drift: bool
    digest: str


@dataclass
class Sample:
    """One sampled response to a prompt, with the sampler's log-probs of the tokens it drew."""

    uid: str
    prompt: Prompt
    group_index: int  # which of the G samples of this prompt
    response_ids: list[int]
    response_text: str
    sampler_logprobs: list[float]  # log q(y_t | prefix) recorded by the sampler, one per response token
    weight_version: int
    finish_reason: str = "stop"
    # episodes: 1 on the tokens the student drew, 0 on environment and template tokens (None: all drawn)
    loss_mask: list[int] | None = None
    episode: Episode | None = None

    def validate(self) -> None:
        if len(self.response_ids) != len(self.sampler_logprobs):
            raise RecordError(
                f"Sample {self.uid}: {len(self.response_ids)} response tokens but "
                f"{len(self.sampler_logprobs)} sampler logprobs"
            )
        if self.loss_mask is not None and len(self.loss_mask) != len(self.response_ids):
            raise RecordError(f"Sample {self.uid}: a loss mask of {len(self.loss_mask)} for "
                              f"{len(self.response_ids)} response tokens")
        if not all(math.isfinite(x) for x in self.sampler_logprobs):
            raise RecordError(f"Sample {self.uid}: non-finite sampler logprob")

    @property
    def full_ids(self) -> list[int]:
        return self.prompt.token_ids + self.response_ids

    @property
    def drawn_mask(self) -> list[int]:
        """1 on each response token the sampler drew: all of them, but an episode's environment and template
        tokens."""
        return self.loss_mask if self.loss_mask is not None else [1] * len(self.response_ids)

    def checked_ids(self, reader: str) -> list[int]:
        """``full_ids`` for the teacher or the learner, checked against an episode ledger's digest: both must
        read exactly the ids the sampler continued from and drew, never a re-tokenised transcript."""
        ids = self.full_ids
        if self.episode is not None and ids_digest(ids) != self.episode.digest:
            raise RecordError(f"Sample {self.uid}: the {reader}'s {len(ids)} ids are not the episode "
                              f"ledger's (digest {ids_digest(ids)} != {self.episode.digest})")
        return ids


@dataclass
class RolloutBatch:
    """All samples of one step, grouped G per prompt in prompt order."""

    step: int
    samples: list[Sample]
    group_size: int
    weight_version: int
    generate_seconds: float = 0.0

    def validate(self) -> None:
        if len(self.samples) % self.group_size:
            raise RecordError(f"RolloutBatch step {self.step}: {len(self.samples)} samples not a multiple of "
                              f"G={self.group_size}")
        uids = [s.uid for s in self.samples]
        if len(set(uids)) != len(uids):
            raise RecordError(f"RolloutBatch step {self.step}: duplicate sample uids")
        for s in self.samples:
            s.validate()

    @property
    def num_response_tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples)


@dataclass
class TeacherScores:
    """Teacher log-probs of each response token, aligned one-to-one with ``Sample.response_ids``."""

    uids: list[str]
    logprobs: list[list[float]]  # [B][T_b]
    topk_ids: list[list[list[int]]] | None = None  # [B][T_b][K]
    topk_logprobs: list[list[list[float]]] | None = None  # [B][T_b][K]
    score_seconds: float = 0.0
    # [B] float32 arrays [T_b, H]: the teacher's final hidden state at the position predicting each response
    # token (opd.full_vocab_source=teacher: the learner applies the teacher's LM head to them)
    hidden: list | None = None
    # a teacher with another tokenizer (opd.teacher.cross): each student token's byte-aligned chunk (-1: not
    # scored, out of the loss); ``logprobs`` then holds each chunk's teacher log-prob on its last student
    # token and 0 on the others, so a chunk's values sum to the teacher's log-prob of its bytes
    chunks: list[list[int]] | None = None
    # counts over the scored samples (opd.teacher.cross.CROSS_COUNTS), summed across chunks of a batch
    cross_counts: dict[str, float] | None = None

    def validate(self, samples: list[Sample]) -> None:
        if self.uids != [s.uid for s in samples]:
            raise RecordError("TeacherScores: uids do not match the rollout batch order")
        for s, lp in zip(samples, self.logprobs, strict=True):
            if len(lp) != len(s.response_ids):
                raise RecordError(
                    f"TeacherScores {s.uid}: {len(lp)} teacher logprobs for {len(s.response_ids)} "
                    "response tokens"
                )
        if self.topk_ids is not None:
            for s, ids, lps in zip(samples, self.topk_ids, self.topk_logprobs or [], strict=True):
                if len(ids) != len(s.response_ids) or len(lps) != len(s.response_ids):
                    raise RecordError(f"TeacherScores {s.uid}: top-k rows do not match response length")
        if self.chunks is not None:
            for s, c in zip(samples, self.chunks, strict=True):
                if len(c) != len(s.response_ids):
                    raise RecordError(f"TeacherScores {s.uid}: {len(c)} chunk ids for {len(s.response_ids)} "
                                      "response tokens")
        if self.hidden is not None:
            for s, h in zip(samples, self.hidden, strict=True):
                if h.shape[0] != len(s.response_ids):
                    raise RecordError(f"TeacherScores {s.uid}: {h.shape[0]} hidden-state rows for "
                                      f"{len(s.response_ids)} response tokens")

    @staticmethod
    def concat(parts: list[TeacherScores]) -> TeacherScores:
        """Several chunks' scores as one record, in order (scoring seconds add up)."""
        if len(parts) == 1:
            return parts[0]
        topk, hidden = parts[0].topk_ids is not None, parts[0].hidden is not None
        counts = None
        if parts[0].cross_counts is not None:
            counts = {k: sum(p.cross_counts[k] for p in parts) for k in parts[0].cross_counts}
        return TeacherScores(
            uids=[u for p in parts for u in p.uids], logprobs=[x for p in parts for x in p.logprobs],
            topk_ids=[x for p in parts for x in p.topk_ids] if topk else None,
            topk_logprobs=[x for p in parts for x in p.topk_logprobs] if topk else None,
            score_seconds=sum(p.score_seconds for p in parts),
            hidden=[x for p in parts for x in p.hidden] if hidden else None,
            chunks=[x for p in parts for x in p.chunks] if parts[0].chunks is not None else None,
            cross_counts=counts,
        )

    def rows(self, idx: list[int]) -> TeacherScores:
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return TeacherScores(pick(self.uids), pick(self.logprobs), pick(self.topk_ids),
                             pick(self.topk_logprobs), self.score_seconds, pick(self.hidden),
                             pick(self.chunks), self.cross_counts)

    def scored_mask(self, i: int, drawn: list[int]) -> list[int]:
        """Sample ``i``'s tokens that carry the teacher's signal: ``drawn`` (``Sample.drawn_mask``) less those
        a teacher with another tokenizer did not score."""
        if self.chunks is None:
            return drawn
        return [m if c >= 0 else 0 for m, c in zip(drawn, self.chunks[i], strict=True)]

    def nonfinite_samples(self) -> int:
        """Samples with a NaN/inf teacher log-prob (sampled token or top-k). Not an error here: such a value
        makes the step's loss non-finite, and the learner skips that update on every rank, which is the
        survivable outcome."""
        rows = zip(self.logprobs, self.topk_logprobs or [None] * len(self.logprobs), strict=True)
        return sum(1 for lp, k in rows
                   if not all(map(math.isfinite, lp))
                   or (k and not all(math.isfinite(x) for r in k for x in r)))


class PendingScores(Protocol):
    """Teacher scores still being computed (``opd.teacher.multi.TeacherCall``)."""

    def result(self) -> TeacherScores:
        """Wait for the scores (raising the teacher's error)."""
        ...


@dataclass
class Rewards:
    """One scalar reward per sample, plus per-verifier parts and failures (a failed verifier scores 0)."""

    uids: list[str]
    rewards: list[float]
    correct: list[bool]
    per_verifier: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # uid -> reason
    verify_seconds: float = 0.0

    @staticmethod
    def concat(parts: list[Rewards]) -> Rewards:
        """Several chunks' rewards as one record, in order (verifier seconds add up: the chunks ran in
        turn)."""
        if len(parts) == 1:
            return parts[0]
        names = list(parts[0].per_verifier)
        return Rewards(
            uids=[u for p in parts for u in p.uids], rewards=[x for p in parts for x in p.rewards],
            correct=[x for p in parts for x in p.correct],
            per_verifier={n: [x for p in parts for x in p.per_verifier[n]] for n in names},
            failures={u: why for p in parts for u, why in p.failures.items()},
            verify_seconds=sum(p.verify_seconds for p in parts),
        )

    def rows(self, idx: list[int]) -> Rewards:
        uids = [self.uids[i] for i in idx]
        return Rewards(uids, [self.rewards[i] for i in idx], [self.correct[i] for i in idx],
                       {n: [v[i] for i in idx] for n, v in self.per_verifier.items()},
                       {u: self.failures[u] for u in uids if u in self.failures}, self.verify_seconds)

    def varied_groups(self, group_size: int) -> list[int]:
        """The groups (of ``group_size`` consecutive samples) whose rewards are not all equal: the only ones a
        group-relative advantage learns from (DAPO's dynamic sampling keeps these, ``drop_uniform_groups``
        too)."""
        return [k for k in range(len(self.rewards) // group_size)
                if len(set(self.rewards[k * group_size : (k + 1) * group_size])) > 1]

    def validate(self, samples: list[Sample]) -> None:
        if self.uids != [s.uid for s in samples]:
            raise RecordError("Rewards: uids do not match the rollout batch order")
        if len(self.rewards) != len(samples) or len(self.correct) != len(samples):
            raise RecordError("Rewards: length does not match the rollout batch")
        if not all(math.isfinite(r) for r in self.rewards):
            raise RecordError("Rewards: non-finite reward")


@dataclass
class ScoredChunk:
    """One generation call's samples, verified, with their teacher scores in flight (None: no teacher actor
    scores them, e.g. the learner runs the teacher itself)."""

    rewards: Rewards
    teacher: PendingScores | None = None


@dataclass
class TrainBatch:
    """What the learner needs: token ids, response spans, per-token advantages and the sampler's log-probs.

    ``advantages`` are per token and already detached numbers; the objective decides how they are used.
    """

    uids: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    advantages: list[list[float]]
    teacher_logprobs: list[list[float]] | None
    objective: str  # a name in opd.trainer.objectives
    loss_weights: list[float] | None = None  # per-sample multiplier (PACED, quality gate); 1.0 when None
    teacher_topk_ids: list[list[list[int]]] | None = None  # [B][T_b][K] for the teacher top-k divergence
    teacher_topk_logprobs: list[list[list[float]]] | None = None
    # SDPO self-teacher prompt per sample (None: no context)
    teacher_prompt_ids: list[list[int] | None] | None = None
    routes: list[str] | None = None  # self-teacher objectives: each sample's route (``Objective.routes``)
    # [B] float32 arrays [T_b, H] from the teacher actor (TeacherScores.hidden)
    teacher_hidden: list | None = None
    # episodes: per token 1 where the student drew it; environment and template tokens are out of the loss
    loss_mask: list[list[int]] | None = None
    # a teacher with another tokenizer: each response token's chunk (TeacherScores.chunks); the objectives
    # give every token of a chunk the chunk's advantage (opd.trainer.objectives.loss.chunk_credit)
    teacher_chunks: list[list[int]] | None = None

    def validate(self) -> None:
        n = len(self.uids)
        for name in ("prompt_ids", "response_ids", "sampler_logprobs", "advantages"):
            if len(getattr(self, name)) != n:
                raise RecordError(f"TrainBatch: {name} has {len(getattr(self, name))} rows for {n} samples")
        for i, uid in enumerate(self.uids):
            t = len(self.response_ids[i])
            if len(self.sampler_logprobs[i]) != t or len(self.advantages[i]) != t:
                raise RecordError(f"TrainBatch {uid}: per-token rows do not match {t} response tokens")
            if self.teacher_logprobs is not None and len(self.teacher_logprobs[i]) != t:
                raise RecordError(f"TrainBatch {uid}: teacher row does not match {t} response tokens")
            if self.teacher_topk_ids is not None and len(self.teacher_topk_ids[i]) != t:
                raise RecordError(f"TrainBatch {uid}: teacher top-k rows do not match {t} response tokens")
            if self.loss_mask is not None and len(self.loss_mask[i]) != t:
                raise RecordError(f"TrainBatch {uid}: loss mask does not match {t} response tokens")
            if self.teacher_chunks is not None and len(self.teacher_chunks[i]) != t:
                raise RecordError(f"TrainBatch {uid}: chunk ids do not match {t} response tokens")
            if self.teacher_hidden is not None and self.teacher_hidden[i].shape[0] != t:
                raise RecordError(f"TrainBatch {uid}: teacher hidden-state rows do not match {t} "
                                  "response tokens")
        for name in ("loss_weights", "teacher_prompt_ids", "routes", "teacher_topk_ids",
                     "teacher_topk_logprobs", "teacher_hidden", "loss_mask", "teacher_chunks"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise RecordError(f"TrainBatch: {name} has {len(value)} rows for {n} samples")
