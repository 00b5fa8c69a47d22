"""Router: turn one step's rollouts, rewards and teacher scores into the learner's ``TrainBatch``.

Decides, sample by sample, which objective learns from it (SRPO: correct -> GRPO, failed with a self-teacher
context -> SDPO), which samples are dropped (uniform groups, quality gate) and how much each weighs (PACED).
Advantages are computed here as plain numbers wherever they need no model (OPD's and ExOPD's need the
learner's log pi: the learner computes them), so the batch can be dumped and replayed into a learner alone.
Rules take plain values (``RoutePlan``), never the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd.signal import TeacherSignal
from opd.trainer.advantages import grpo_advantages
from opd.trainer.objectives import get
from opd.trainer.sdpo import build_reprompt, self_teacher_contexts
from opd.trainer.weights import paced_weights, quality_gate
from opd.types import Rewards, RolloutBatch, Sample, TeacherScores, TrainBatch


@dataclass(frozen=True)
class RoutePlan:
    objective: str  # a name in opd.trainer.objectives
    norm_by_std: bool = True
    adv_eps: float = 1e-6
    # what of the teacher's scores the learner reads (top-k rows, hidden states)
    signal: TeacherSignal = TeacherSignal()
    paced: tuple[float, float] | None = None  # (a, b) of w(p) = p^a (1-p)^b
    quality_gate: float | None = None
    drop_uniform_groups: bool = False
    success_threshold: float = 1.0
    dont_reprompt_on_self_success: bool = True
    max_reprompt_len: int = 256


def _groups(n: int, g: int) -> list[range]:
    return [range(s, s + g) for s in range(0, n, g)]


def _self_teacher_prompts(samples: list[Sample], rewards: Rewards, g: int, plan: RoutePlan,
                          render: Callable[[str], list[int]]):
    """Per sample: the rendered self-teacher prompt (a sibling's correct answer shown), or None without
    one."""
    prompts: list[list[int] | None] = []
    for grp in _groups(len(samples), g):
        contexts = self_teacher_contexts(
            [rewards.rewards[i] for i in grp], [samples[i].response_text for i in grp], [None] * g,
            success_threshold=plan.success_threshold,
            dont_reprompt_on_self_success=plan.dont_reprompt_on_self_success,
            include_feedback=False,
        )
        for i, ctx in zip(grp, contexts, strict=True):
            if ctx is None:
                prompts.append(None)
            else:
                text = build_reprompt(samples[i].prompt.columns.get("prompt", samples[i].prompt.text),
                                      ctx.solution, ctx.feedback)
                prompts.append(render(text)[: plan.max_reprompt_len])
    return prompts


def _sample_weights(rewards: Rewards, g: int, plan: RoutePlan) -> list[float] | None:
    w = torch.ones(len(rewards.rewards))
    if plan.paced is not None:
        pass_rate = torch.tensor(rewards.correct, dtype=torch.float32).view(-1, g).mean(-1)
        w = w * paced_weights(pass_rate, *plan.paced).repeat_interleave(g)
    if plan.quality_gate is not None:
        w = w * quality_gate(torch.tensor(rewards.rewards), plan.quality_gate)
    return None if plan.paced is None and plan.quality_gate is None else w.tolist()


def route(
    rollouts: RolloutBatch, rewards: Rewards, scores: TeacherScores | None, plan: RoutePlan,
    render: Callable[[str], list[int]] | None = None,
) -> TrainBatch | None:
    """The step's TrainBatch, or None when every sample was dropped (nothing to learn this step)."""
    samples, g = rollouts.samples, rollouts.group_size
    rewards.validate(samples)
    if scores is not None:
        scores.validate(samples)
    lengths = [len(s.response_ids) for s in samples]
    objective = get(plan.objective)
    if plan.signal.scored_by_actor and scores is None:
        raise ValueError(f"{plan.objective} needs the teacher's per-token log-probs, "
                         "and no teacher scores came with the batch")
    if objective.group_advantages:
        adv = grpo_advantages(torch.tensor(rewards.rewards).view(-1, g), norm_by_std=plan.norm_by_std,
                              eps=plan.adv_eps).flatten()
        advantages = [[float(a)] * n for a, n in zip(adv, lengths, strict=True)]
    else:
        # A teacher's per-token advantage is the learner's to compute, from its own current log pi (the
        # sampler's log q would bias the gradient whenever q != pi); a divergence over the vocabulary uses
        # none.
        advantages = [[0.0] * n for n in lengths]
    teacher_prompts = routes = None
    if objective.self_teacher:
        teacher_prompts = _self_teacher_prompts(samples, rewards, g, plan, render)
        routes = objective.routes([tp is not None for tp in teacher_prompts], rewards.correct)
    keep = list(range(len(samples)))
    if plan.drop_uniform_groups:
        keep = [i for k in rewards.varied_groups(g) for i in range(k * g, (k + 1) * g)]
    if not keep:
        return None
    for i in keep:  # an episode trains on exactly its ledger's ids
        samples[i].checked_ids("learner")
    pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
    masks = None  # every response token trains
    if any(s.loss_mask is not None for s in samples) or (scores is not None and scores.chunks is not None):
        masks = [s.drawn_mask if scores is None else scores.scored_mask(i, s.drawn_mask)
                 for i, s in enumerate(samples)]
    batch = TrainBatch(
        uids=pick([s.uid for s in samples]),
        prompt_ids=pick([s.prompt.token_ids for s in samples]),
        response_ids=pick([s.response_ids for s in samples]),
        sampler_logprobs=pick([s.sampler_logprobs for s in samples]),
        advantages=pick(advantages),
        teacher_logprobs=pick(scores.logprobs) if scores is not None else None,
        objective=plan.objective,
        loss_weights=pick(_sample_weights(rewards, g, plan)),
        teacher_topk_ids=pick(scores.topk_ids) if scores is not None and plan.signal.kind == "topk" else None,
        teacher_topk_logprobs=(pick(scores.topk_logprobs)
                               if scores is not None and plan.signal.kind == "topk" else None),
        teacher_prompt_ids=pick(teacher_prompts),
        routes=pick(routes),
        teacher_hidden=pick(scores.hidden) if scores is not None and plan.signal.hidden else None,
        loss_mask=pick(masks) if masks is not None else None,
        teacher_chunks=pick(scores.chunks) if scores is not None else None,
    )
    batch.validate()
    return batch


def teacher_reverse_kl(rollouts: RolloutBatch, scores: TeacherScores) -> float | None:
    """Mean sampled-token reverse KL ``log q - log pi_T`` per drawn response token (the OPD progress figure;
    an episode's environment and template tokens were not drawn and do not count). With a teacher of
    another tokenizer each scored chunk adds its log-ratio (its teacher values sum to the chunk's); None when
    it scored no token (a mean over nothing is not 0)."""
    total = count = 0.0
    for i, (s, lp) in enumerate(zip(rollouts.samples, scores.logprobs, strict=True)):
        mask = scores.scored_mask(i, s.drawn_mask)
        total += sum(m * (q - t) for m, q, t in zip(mask, s.sampler_logprobs, lp, strict=True))
        count += sum(mask)
    return total / count if count else None
