"""Which per-token loss each objective applies to a micro-batch, and over which tokens it is averaged.

Every objective returns ``(loss_BT, count_BT)``: the per-token loss already multiplied by its weights, and the
tokens that belong in the denominator. The learner sums ``loss_BT`` over micro-batches and divides by the
batch-wide ``count_BT`` total, which is the token-mean of the whole batch however it is split (§0.2), and keeps
SDPO samples without a teacher out of the denominator (§10.4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd.signal import TeacherSignal, teacher_signal
from opd.trainer.advantages import opd_token_advantages
from opd.trainer.divergences import full_vocab_divergence, teacher_topk_forward_kl
from opd.trainer.losses import clipped_pg_token_loss, prefix_is_weights, token_logprobs, truncated_is_weights
from opd.trainer.objectives import gopd_token_advantages
from opd.trainer.sdpo import sdpo_token_loss

OBJECTIVES = ("opd", "grpo", "exopd", "sdpo", "srpo")


@dataclass(frozen=True)
class ObjectiveSpec:
    """The learner's view of the objective: plain values, no config objects."""

    name: str = "opd"
    agg: str = "token-mean"  # GRPO may use the sequence-level modes; every other objective is token-mean
    clip_low: float = 0.2
    clip_high: float = 0.2
    tis_cap: float = 2.0
    norm_len: int | None = None
    opd_divergence: str = "sampled"  # sampled | teacher_topk | full_vocab
    full_vocab_kind: str = "reverse"
    full_vocab_source: str = "learner"  # learner: HF forward of the teacher here; teacher: its actor sends hidden states
    jsd_beta: float = 0.5
    opd_kl_coef: float = 1.0
    exopd_lam: float = 1.25
    sdpo_top_k: int = 100
    sdpo_alpha: float = 0.5
    sdpo_is_cap: float = 2.0
    sdpo_ema_rate: float = 0.05
    srpo_entropy_beta: float = 1.0
    select_mode: str | None = None  # TIP token selection (opd/exopd only)
    keep_ratio: float = 1.0

    @property
    def needs_self_teacher(self) -> bool:
        return self.name in ("sdpo", "srpo")

    @property
    def needs_reference(self) -> bool:
        return self.name == "exopd"

    @property
    def signal(self) -> TeacherSignal:
        """The teacher signal this objective reads (``opd.signal``: decided there, as for every other role)."""
        return teacher_signal(self.name, self.opd_divergence, self.full_vocab_source, top_k=0)

    @property
    def needs_hf_teacher(self) -> bool:
        return self.signal.learner_runs_teacher

    @property
    def needs_teacher_head(self) -> bool:
        """The teacher's actor sends its hidden states; this learner holds only the teacher's LM head."""
        return self.signal.hidden


def _at(t: torch.Tensor | None, piece: tuple) -> torch.Tensor | None:
    return None if t is None else t[piece]


@dataclass
class Aux:
    """Per-micro-batch tensors computed without gradient before the learning pass (teacher/reference side).

    A teacher's full distribution is never held for the whole micro-batch: ``teacher_head`` computes it for one
    piece (``opd.trainer.chunks``) from the teacher's hidden states, and ``piece`` fills ``teacher_logits_BTV`` with
    it for the loss of that piece only."""

    teacher_logp_BT: torch.Tensor | None = None  # scored by the teacher server (or the learner's HF teacher)
    topk_ids_BTK: torch.Tensor | None = None
    topk_logp_BTK: torch.Tensor | None = None
    ref_logp_BT: torch.Tensor | None = None  # ExOPD reference model
    teacher_logits_BTV: torch.Tensor | None = None  # one piece's HF-teacher / listed-vocabulary / self-teacher logits
    teacher_head: Callable[[tuple], torch.Tensor] | None = None  # piece -> that piece's teacher logits
    route_sdpo_B: torch.Tensor | None = None  # SRPO/SDPO: 1 where the sample learns from the self-teacher
    entropy_weights_BT: torch.Tensor | None = None  # SRPO exp(-beta*H) normalised over SDPO tokens

    def piece(self, p: tuple) -> Aux:
        """The tensors of one piece of the micro-batch, with that piece's teacher logits computed."""
        return Aux(
            teacher_logp_BT=_at(self.teacher_logp_BT, p), topk_ids_BTK=_at(self.topk_ids_BTK, p),
            topk_logp_BTK=_at(self.topk_logp_BTK, p), ref_logp_BT=_at(self.ref_logp_BT, p),
            teacher_logits_BTV=self.teacher_head(p) if self.teacher_head is not None else None,
            route_sdpo_B=_at(self.route_sdpo_B, p[:1]), entropy_weights_BT=_at(self.entropy_weights_BT, p),
        )


def _pg(spec: ObjectiveSpec, logp_BT, sampler_BT, adv_BT) -> torch.Tensor:
    """Per-token clipped policy-gradient loss, on-policy (old = current, detached), with truncated IS weights."""
    w_BT = truncated_is_weights(logp_BT, sampler_BT, spec.tis_cap)
    loss_BT, _, _ = clipped_pg_token_loss(
        logp_BT, logp_BT.detach(), adv_BT, clip_low=spec.clip_low, clip_high=spec.clip_high, token_weights_BT=w_BT
    )
    return loss_BT


def token_loss(
    spec: ObjectiveSpec, logits_BTV, targets_BT, mask_BT, sampler_BT, adv_BT, aux: Aux
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, denominator tokens) for one micro-batch; both [B, T] and zero outside ``mask_BT``."""
    logp_BT = token_logprobs(logits_BTV, targets_BT)
    if spec.name == "grpo":
        return _pg(spec, logp_BT, sampler_BT, adv_BT) * mask_BT, mask_BT
    if spec.name == "exopd" or (spec.name == "opd" and spec.opd_divergence == "sampled"):
        if aux.teacher_logp_BT is None:
            raise ValueError(f"{spec.name} needs the teacher's per-token log-probs, and the batch carries none")
        # The advantage takes the learner's log pi, not the sampler's log q: with _pg's truncated weight pi/q the
        # expected gradient is then grad KL(pi || pi_T) even when q != pi (stale weights, another engine's numerics).
        if spec.name == "opd":
            adv = opd_token_advantages(logp_BT, aux.teacher_logp_BT, mask_BT, coef=spec.opd_kl_coef)
        else:
            adv = gopd_token_advantages(aux.teacher_logp_BT, aux.ref_logp_BT, logp_BT, mask_BT, lam=spec.exopd_lam)
        return _pg(spec, logp_BT, sampler_BT, adv) * mask_BT, mask_BT
    if spec.name == "opd" and spec.opd_divergence in ("teacher_topk", "full_vocab"):
        if spec.opd_divergence == "teacher_topk":
            div = teacher_topk_forward_kl(torch.log_softmax(logits_BTV.float(), -1), aux.topk_ids_BTK, aux.topk_logp_BTK)
        else:
            div = full_vocab_divergence(logits_BTV, aux.teacher_logits_BTV, mask_BT, kind=spec.full_vocab_kind, beta=spec.jsd_beta)
        # The divergence is taken at states the sampler visited: those of an older policy (max_staleness >= 1), or
        # of an engine whose numerics differ, are reweighted towards the states the learner's policy would visit.
        return div * prefix_is_weights(logp_BT, sampler_BT, mask_BT, spec.tis_cap) * mask_BT, mask_BT
    if spec.name in ("sdpo", "srpo"):
        sd_loss_BT, _ = sdpo_token_loss(
            logits_BTV, aux.teacher_logits_BTV, logp_BT.detach(), sampler_BT, mask_BT,
            k=spec.sdpo_top_k, alpha=spec.sdpo_alpha, is_cap=spec.sdpo_is_cap, logp_BT=logp_BT,
            # On-policy the pi/pi_old ratio is 1, so the sampler->learner weight is the one sdpo.is_cap must bound.
            rollout_is_cap=spec.sdpo_is_cap,
        )
        z_sd = aux.route_sdpo_B.unsqueeze(-1) * mask_BT
        if spec.name == "sdpo":
            return sd_loss_BT * z_sd, z_sd
        # SRPO (§5.3): both branches over one shared denominator of all routed tokens.
        z_g = (1.0 - aux.route_sdpo_B).unsqueeze(-1) * mask_BT
        g_loss_BT = _pg(spec, logp_BT, sampler_BT, adv_BT)
        return z_g * g_loss_BT + z_sd * aux.entropy_weights_BT * sd_loss_BT, mask_BT
    raise ValueError(f"unknown objective {spec.name!r} / opd divergence {spec.opd_divergence!r}; valid: {OBJECTIVES}")
