"""Objectives as modules behind one protocol. Each module here is one objective: what it needs (groups of
samples, a self-teacher, a reference model; its teacher signal is decided in ``opd.signal``), how the router
treats its samples, and its per-token loss with the tokens of its denominator. Router, learner and config are
generic over ``Objective``; adding one is a module here, its test, its config section (and its ``opd.signal`` entry
when it reads a teacher).

Every ``token_loss`` returns ``(loss_BT, count_BT)``: the per-token loss already multiplied by its weights, and the
tokens that belong in the denominator, both zero outside ``mask_BT``. The learner sums ``loss_BT`` over
micro-batches and divides by the batch-wide ``count_BT`` total (§0.2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from opd.trainer.losses import clipped_pg_token_loss, truncated_is_weights

if TYPE_CHECKING:
    from opd.trainer.objective import Aux, ObjectiveSpec


class Objective:
    name: ClassVar[str]
    group_advantages: ClassVar[bool] = False  # the router computes GRPO's group-relative advantages from rewards
    self_teacher: ClassVar[bool] = False  # siblings' answers as context: router prompts, an EMA self-teacher
    reference: ClassVar[bool] = False  # a frozen reference model (exopd.reference, default the student)
    min_group: ClassVar[int] = 1  # rollout.group_size it needs
    sequence_agg: ClassVar[bool] = False  # grpo.loss_agg's sequence-level modes apply
    token_selection: ClassVar[bool] = False  # TIP (selection.mode) ranks its sampled-token divergence
    entropy_weighted: ClassVar[bool] = False  # SRPO: the self-teacher's exp(-beta*H) weights its SDPO tokens
    routed_denominator: ClassVar[bool] = False  # only samples routed to it count in the denominator (SDPO §10.4)
    tis_section: ClassVar[str] = "grpo"  # the config section whose tis_cap caps its sampler->learner weight

    def routes(self, has_teacher: list[bool], correct: list[bool]) -> list[str] | None:
        """Per sample, which loss learns from it (self-teacher objectives); None: this objective's, for all."""
        return None

    def token_loss(self, spec: ObjectiveSpec, logits_BTV: torch.Tensor, targets_BT: torch.Tensor, mask_BT: torch.Tensor,
                   sampler_BT: torch.Tensor, adv_BT: torch.Tensor, aux: Aux) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def pg_token_loss(spec: ObjectiveSpec, logp_BT: torch.Tensor, sampler_BT: torch.Tensor, adv_BT: torch.Tensor) -> torch.Tensor:
    """Per-token policy-gradient loss against the sampler q, as ``grpo.ratio`` says.

    ``tis``: the surrogate's ratio is pi over its detached self (1: one update per batch), and the truncated weight
    min(pi/q, tis_cap) corrects for q != pi. ``ppo``: the ratio is pi/q itself, PPO-clipped to [1 - clip_low,
    1 + clip_high], with ``grpo.dual_clip`` c bounding a negative advantage's loss at -c*A (Ye et al. 2020): stale
    or mismatched tokens stop pulling once outside the trust region instead of being re-weighted."""
    if spec.ratio == "ppo":
        loss_BT, _, _ = clipped_pg_token_loss(logp_BT, sampler_BT, adv_BT, clip_low=spec.clip_low,
                                              clip_high=spec.clip_high, dual_clip=spec.dual_clip)
        return loss_BT
    w_BT = truncated_is_weights(logp_BT, sampler_BT, spec.tis_cap)
    loss_BT, _, _ = clipped_pg_token_loss(
        logp_BT, logp_BT.detach(), adv_BT, clip_low=spec.clip_low, clip_high=spec.clip_high, token_weights_BT=w_BT
    )
    return loss_BT


def teacher_logprobs(name: str, aux: Aux) -> torch.Tensor:
    if aux.teacher_logp_BT is None:
        raise ValueError(f"{name} needs the teacher's per-token log-probs, and the batch carries none")
    return aux.teacher_logp_BT


REGISTRY: dict[str, Objective] = {}


def register(obj: Objective) -> Objective:
    REGISTRY[obj.name] = obj
    return obj


def get(name: str) -> Objective:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(REGISTRY)}") from None


# Registered on import, in the order the config lists them.
from opd.trainer.objectives import exopd, grpo, opd, opd_reward, sdpo, srpo  # noqa: E402, F401
