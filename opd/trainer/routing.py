"""Router: turn one step's rollouts, rewards and teacher scores into the learner's ``TrainBatch``.

Per-token advantages are computed here, as plain numbers, so the learner only ever sees detached constants and
the batch can be dumped and replayed into a learner alone.
"""

from __future__ import annotations

import torch

from opd.trainer.advantages import grpo_advantages, opd_token_advantages
from opd.types import Rewards, RolloutBatch, TeacherScores, TrainBatch


def _pad(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    values = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        mask[i, : len(r)] = 1.0
    return values, mask


def _unpad(values_BT: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [values_BT[i, :n].tolist() for i, n in enumerate(lengths)]


def route_opd(rollouts: RolloutBatch, scores: TeacherScores, *, kl_coef: float) -> TrainBatch:
    """Every sample learns from the teacher, token by token (sampled-token reverse KL as advantage)."""
    samples = rollouts.samples
    scores.validate(samples)
    sampler_BT, mask_BT = _pad([s.sampler_logprobs for s in samples])
    teacher_BT, _ = _pad(scores.logprobs)
    adv_BT = opd_token_advantages(sampler_BT, teacher_BT, mask_BT, coef=kl_coef)
    return TrainBatch(
        uids=[s.uid for s in samples],
        prompt_ids=[s.prompt.token_ids for s in samples],
        response_ids=[s.response_ids for s in samples],
        sampler_logprobs=[s.sampler_logprobs for s in samples],
        advantages=_unpad(adv_BT, [len(s.response_ids) for s in samples]),
        teacher_logprobs=scores.logprobs,
        objective="opd",
    )


def route_grpo(rollouts: RolloutBatch, rewards: Rewards, *, norm_by_std: bool, eps: float) -> TrainBatch:
    """Every sample gets its group-relative reward advantage on each of its tokens."""
    samples = rollouts.samples
    rewards.validate(samples)
    g = rollouts.group_size
    adv_PG = grpo_advantages(torch.tensor(rewards.rewards).view(-1, g), norm_by_std=norm_by_std, eps=eps)
    adv = adv_PG.flatten().tolist()
    return TrainBatch(
        uids=[s.uid for s in samples],
        prompt_ids=[s.prompt.token_ids for s in samples],
        response_ids=[s.response_ids for s in samples],
        sampler_logprobs=[s.sampler_logprobs for s in samples],
        advantages=[[a] * len(s.response_ids) for a, s in zip(adv, samples, strict=True)],
        teacher_logprobs=None,
        objective="grpo",
    )


def teacher_reverse_kl(rollouts: RolloutBatch, scores: TeacherScores) -> float:
    """Mean sampled-token reverse KL ``log q - log pi_T`` per response token (the OPD progress figure)."""
    total = sum(sum(q - t for q, t in zip(s.sampler_logprobs, lp, strict=True)) for s, lp in zip(rollouts.samples, scores.logprobs, strict=True))
    return total / max(1, rollouts.num_response_tokens)
