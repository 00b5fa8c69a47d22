"""The learner's view of the objective (``ObjectiveSpec``: plain values), the teacher-side tensors of a micro-batch
(``Aux``), and ``token_loss``, which hands both to the objective's own module (``opd.trainer.objectives``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd.signal import TeacherSignal, teacher_signal
from opd.trainer.divergences import kl_penalty
from opd.trainer.losses import token_logprobs
from opd.trainer.objectives import Objective, get


@dataclass(frozen=True)
class ObjectiveSpec:
    """The learner's view of the objective: plain values, no config objects."""

    name: str = "opd"
    agg: str = "token-mean"  # GRPO may use the sequence-level modes; every other objective is token-mean
    clip_low: float = 0.2
    clip_high: float = 0.2
    tis_cap: float = 2.0
    ratio: str = "tis"  # tis | ppo (opd.trainer.objectives.pg_token_loss)
    dual_clip: float | None = None  # ppo: bound of a negative advantage's loss, -dual_clip * A
    norm_len: int | None = None
    opd_divergence: str = "sampled"  # sampled | teacher_topk | full_vocab
    full_vocab_kind: str = "reverse"
    full_vocab_source: str = "learner"  # learner: HF forward of the teacher here; teacher: its actor sends hidden states
    jsd_beta: float = 0.5
    opd_kl_coef: float = 1.0
    exopd_lam: float = 1.25
    opd_reward_kl_weight: float = 1.0  # opd_reward: weight of the teacher's per-token term
    opd_reward_reward_weight: float = 1.0  # opd_reward: weight of the GRPO task-reward advantage
    kl_ref_coef: float = 0.0  # > 0: a KL penalty to the reference model on top of any objective
    kl_ref_kind: str = "low_var_kl"  # k1 | k2 | k3 | low_var_kl (opd.trainer.divergences.kl_penalty)
    sdpo_top_k: int = 100
    sdpo_alpha: float = 0.5
    sdpo_is_cap: float = 2.0
    sdpo_ema_rate: float = 0.05
    srpo_entropy_beta: float = 1.0
    select_mode: str | None = None  # TIP token selection (opd/exopd only)
    keep_ratio: float = 1.0

    @property
    def objective(self) -> Objective:
        return get(self.name)

    @property
    def needs_self_teacher(self) -> bool:
        return self.objective.self_teacher

    @property
    def needs_reference(self) -> bool:
        return self.objective.reference or self.kl_ref_coef > 0

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


def token_loss(
    spec: ObjectiveSpec, logits_BTV, targets_BT, mask_BT, sampler_BT, adv_BT, aux: Aux
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, denominator tokens) for one micro-batch, from ``spec.name``'s module in ``opd.trainer.objectives``,
    plus ``kl_ref.coef`` times the per-token KL to the reference model on the tokens the objective counts (so it
    shares the objective's denominator, whichever objective it is)."""
    loss_BT, count_BT = get(spec.name).token_loss(spec, logits_BTV, targets_BT, mask_BT, sampler_BT, adv_BT, aux)
    if spec.kl_ref_coef:
        if aux.ref_logp_BT is None:
            raise ValueError("kl_ref.coef > 0 needs the reference model's log-probs, and the micro-batch carries none")
        kl_BT = kl_penalty(token_logprobs(logits_BTV, targets_BT), aux.ref_logp_BT, spec.kl_ref_kind)
        loss_BT = loss_BT + spec.kl_ref_coef * kl_BT * count_BT
    return loss_BT, count_BT
