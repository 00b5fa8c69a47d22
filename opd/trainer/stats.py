"""What one rank measured over its shard of a step, and the batch's figures after the ranks meet.

Sums (loss, tokens, entropy, KL, padding, a non-finite flag) add over ranks; maxima (the learner/sampler
log-prob gap, saved activations) take the largest. ``reduce`` does both in one SUM and one MAX collective, in
float64 so a single rank's values pass through exactly; every rank gets the same totals and so takes the same
skip-or-step decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from opd.trainer.dist import Collective

_MAX = ("absdiff", "activation_bytes")


@dataclass(frozen=True)
class StepStats:
    # sum of the micro-batches' loss contributions (each already divided by the batch denominator)
    loss: float = 0.0
    entropy_sum: float = 0.0
    tokens: float = 0.0  # response tokens the LM head ran on (TIP: the kept ones)
    counted: float = 0.0  # tokens in the loss's denominator
    nonfinite: float = 0.0  # 1 on a rank whose loss was not finite
    real_positions: float = 0.0
    padded_positions: float = 0.0
    kl_sum: float = 0.0  # sampled-token log q - log pi_T, when the learner ran the teacher
    kl_tokens: float = 0.0
    absdiff: float = 0.0  # max |log pi - log q| over the shard's tokens
    activation_bytes: float = 0.0  # peak bytes saved for backward by one micro-batch

    def add(self, **values: float) -> StepStats:
        """These statistics with one micro-batch's added (sums) or folded in (maxima)."""
        return replace(self, **{k: (max(getattr(self, k), v) if k in _MAX else getattr(self, k) + v)
                                for k, v in values.items()})

    def reduce(self, comm: Collective) -> StepStats:
        names = [f.name for f in fields(self)]
        sums = [n for n in names if n not in _MAX]
        total = comm.sum(torch.tensor([getattr(self, n) for n in sums], dtype=torch.float64)).tolist()
        peak = comm.max(torch.tensor([getattr(self, n) for n in _MAX], dtype=torch.float64)).tolist()
        return StepStats(**dict(zip(sums, total, strict=True)), **dict(zip(_MAX, peak, strict=True)))

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0

    def metrics(self) -> dict[str, float]:
        """The step's figures as the driver logs them (the learner adds its own: grad norm, lr, seconds)."""
        return {
            "loss": self.loss if self.finite else math.nan,
            "entropy": self.entropy_sum / max(self.tokens, 1.0),
            "learner_sampler_absdiff_max": self.absdiff,
            "train_tokens": self.tokens,
            "loss_tokens": self.counted,
            "activation_mib": self.activation_bytes / 2**20,
            # forward positions of padding
            "pad_fraction": 1.0 - self.real_positions / max(self.padded_positions, 1.0),
            **({"teacher_kl": self.kl_sum / self.kl_tokens} if self.kl_tokens else {}),
        }
