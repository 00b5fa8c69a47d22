"""Advantage estimators (torch only). Advantages are constants for the loss: every output is detached."""

from __future__ import annotations

import torch


def grpo_advantages(rewards_PG: torch.Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantage per sample (§2.1): ``(r - mean_g r) / (std_g r + eps)``.

    ``rewards_PG`` holds P prompts x G samples. ``norm_by_std=False`` is Dr.GRPO's mean-centring (§2.2). The
    std is the unbiased one (as verl and TRL use); a group of one sample gets advantage 0.
    """
    r = rewards_PG.detach().to(torch.float32)
    centred = r - r.mean(dim=-1, keepdim=True)
    if not norm_by_std:
        return centred
    if r.shape[-1] < 2:
        return torch.zeros_like(r)
    std = r.std(dim=-1, keepdim=True)
    # A uniform group carries no signal: 0, also when eps is 0.
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def opd_token_advantages(
    student_logprobs_BT: torch.Tensor, teacher_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor,
    coef: float = 1.0,
) -> torch.Tensor:
    """Sampled-token reverse KL as a per-token advantage (§1.1): ``A_t = -coef * (log pi(y_t) - log
    pi_T(y_t))``.

    ``student_logprobs_BT`` is the learner's current log-prob of the drawn token, not the sampler's log q: the
    policy-gradient term, weighted by pi/q for tokens drawn from q, then has expectation grad KL(pi || pi_T);
    with log q in the advantage it would be off by E_pi[(log q - log pi) grad log pi] whenever q != pi.
    Positive where the teacher likes the drawn token more than the student does. Discount 0: each token
    carries only its own term, as in every reference implementation.
    """
    kl_BT = (student_logprobs_BT - teacher_logprobs_BT).detach()
    return -coef * kl_BT * mask_BT.to(kl_BT.dtype)


def gopd_token_advantages(
    teacher_logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor,
    student_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    lam: float = 1.25,
) -> torch.Tensor:
    """G-OPD per-token reward as a detached advantage (§4.1–4.2), shape [B, T], 0 where masked.

    ``A_t = λ·(log π_T − log π_ref) − (log π_θ − log π_ref)`` on the sampled token, with ``student_logp_BT``
    the rollout-time (old or sampler) log-prob. ``λ = 1`` is plain OPD (π_ref cancels) and is routed through
    ``opd_token_advantages`` so the identity holds bit for bit, as G-OPD's code special-cases it; ``λ > 1`` is
    ExOPD (reward extrapolation past the teacher along ref → teacher, default 1.25); ``0 < λ < 1``
    interpolates.
    """
    if lam == 1.0:
        return opd_token_advantages(student_logp_BT, teacher_logp_BT, mask_BT, coef=1.0)
    ref = ref_logp_BT.detach()
    adv_BT = lam * (teacher_logp_BT.detach() - ref) - (student_logp_BT.detach() - ref)
    return adv_BT * mask_BT.to(adv_BT.dtype)
