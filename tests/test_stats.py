"""A rank's step statistics: micro-batches add up (sums) or fold in (maxima), ranks reduce the same way."""

from __future__ import annotations

import math

from opd.trainer.dist import Collective
from opd.trainer.stats import StepStats


def test_micro_batches_add_and_fold_and_the_metrics_divide_the_totals():
    s = StepStats(real_positions=30.0, padded_positions=40.0, kl_sum=3.0, kl_tokens=12.0)
    s = s.add(loss=0.25, entropy_sum=6.0, tokens=8.0, counted=8.0, absdiff=0.1, activation_bytes=2.0 * 2**20)
    s = s.add(loss=0.5, entropy_sum=3.0, tokens=4.0, counted=2.0, absdiff=0.05, activation_bytes=1.0 * 2**20)
    assert ((s.loss, s.tokens, s.counted, s.absdiff, s.activation_bytes)
            == (0.75, 12.0, 10.0, 0.1, 2.0 * 2**20))
    m = s.metrics()
    assert m == {"loss": 0.75, "entropy": 0.75, "learner_sampler_absdiff_max": 0.1, "train_tokens": 12.0,
                 "loss_tokens": 10.0, "activation_mib": 2.0, "pad_fraction": 0.25, "teacher_kl": 0.25}


def test_a_non_finite_micro_batch_makes_the_loss_nan_and_one_rank_reduces_to_itself():
    s = StepStats(tokens=3.0).add(nonfinite=1.0)
    assert not s.finite and math.isnan(s.metrics()["loss"]) and "teacher_kl" not in s.metrics()
    assert s.reduce(Collective()) == s  # one rank: the collectives are the identity, bit for bit
