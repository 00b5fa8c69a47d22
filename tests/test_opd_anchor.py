"""opd_anchor: the teacher's sampled-token reward with the reference's KL folded in, by hand; beta=0 is OPD;
its reference reaches the config, the pre-flight and the learner through its declarations alone."""

from __future__ import annotations

import pytest
import torch

from opd.config import ConfigError, load_config
from opd.plan import objective_spec, spec_of
from opd.preflight import check_model_dirs
from opd.trainer.objectives.loss import Aux, token_loss

LOGITS = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]], dtype=torch.float64)
TARGETS = torch.tensor([[0, 2]])
MASK = torch.ones(1, 2, dtype=torch.float64)
TEACHER = torch.tensor([[-0.2, -1.5]], dtype=torch.float64)
REFERENCE = torch.tensor([[-0.9, -0.4]], dtype=torch.float64)


def _loss(spec):
    logits = LOGITS.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1).gather(-1, TARGETS.unsqueeze(-1)).squeeze(-1)
    loss_BT, count_BT = token_loss(spec, logits, TARGETS, MASK, logp.detach(),
                                   torch.zeros(1, 2, dtype=torch.float64),
                                   Aux(teacher_logp_BT=TEACHER, ref_logp_BT=REFERENCE))
    loss_BT.sum().backward()
    return loss_BT.detach(), count_BT, logits.grad


def test_loss_and_gradient_by_hand():
    """On-policy the ratio is 1: each token's loss is -A_t and its gradient -A_t * grad log pi(y_t), with
    A_t = -(log pi - log pi_T) - beta * (log pi - log pi_ref), here beta = 0.5."""
    loss, count, grad = _loss(spec_of("algorithm=opd_anchor", "opd_anchor.beta=0.5"))
    logp = torch.log_softmax(LOGITS, -1).gather(-1, TARGETS.unsqueeze(-1)).squeeze(-1)
    a = -(logp - TEACHER) - 0.5 * (logp - REFERENCE)
    torch.testing.assert_close(loss, -a)
    assert torch.equal(count, MASK)
    onehot = torch.nn.functional.one_hot(TARGETS, 3).to(torch.float64)
    torch.testing.assert_close(grad, -a.unsqueeze(-1) * (onehot - torch.softmax(LOGITS, -1)))
    # pinned: the first token's loss, by hand from logp = log softmax([1, 0, -1])[0] = -0.40761
    assert loss[0, 0].item() == pytest.approx(-(-(-0.40761 + 0.2) - 0.5 * (-0.40761 + 0.9)), abs=1e-5)


def test_beta_zero_is_sampled_token_opd_exactly():
    anchored = _loss(spec_of("algorithm=opd_anchor", "opd_anchor.beta=0"))
    opd = _loss(spec_of("algorithm=opd", "opd.divergence=sampled"))
    assert torch.equal(anchored[0], opd[0]) and torch.equal(anchored[2], opd[2])


def test_its_reference_and_signal_come_from_its_declarations(tmp_path):
    cfg = load_config(None, ["algorithm=opd_anchor", f"opd_anchor.reference={tmp_path / 'ref'}",
                             "opd.divergence=teacher_topk", "teacher.top_k=5"])
    assert cfg.reference_dir == str(tmp_path / "ref") and cfg.reference_key == "opd_anchor.reference"
    # no top-k rows it would drop
    assert cfg.teacher_signal.kind == "sampled" and cfg.teacher_signal.top_k == 0
    spec = objective_spec(cfg)
    assert spec.needs_reference and spec.own.beta == 0.1 and spec.tis_cap == cfg.section("opd").tis_cap
    with pytest.raises(ConfigError, match=r"opd_anchor.reference: directory '.*ref' does not exist"):
        check_model_dirs(cfg, teacher=False)
    with pytest.raises(ConfigError, match="opd_anchor.beta: Input should be greater than or equal to 0"):
        load_config(None, ["algorithm=opd_anchor", "opd_anchor.beta=-1"])
