"""What a learner step fixes over its whole batch before the learning pass, without gradient: the tokens TIP
keeps, SRPO's entropy weights, and the denominators of the token- and sequence-means.

Each is a function of the whole batch (a top-``n`` over all its tokens, a mean over all its SDPO tokens, a
count of all its tokens), so computing it per micro-batch would make the update depend on
``trainer.micro_batch_size``. The learner hands these functions one ``[B, T]`` tensor per micro-batch; they
join them (right-padded to the longest
``T``), decide once, and give the pieces back. With several ranks, counts, weight sums and maxima are reduced
over ranks (``Collective``); TIP selects within each rank's shard. Torch only.
"""

from __future__ import annotations

import torch

from opd.trainer.dist import Collective
from opd.trainer.selection import select_tokens
from opd.trainer.weights import entropy_weights


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    t_max = max((p.shape[1] for p in parts), default=1)
    # An empty shard still joins the collectives, with an empty [0, T] batch.
    return torch.cat([torch.nn.functional.pad(p, (0, t_max - p.shape[1])) for p in parts]
                     or [torch.zeros(0, t_max)])


def _split(whole_NT: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in like:
        out.append(whole_NT[start : start + p.shape[0], : p.shape[1]])
        start += p.shape[0]
    return out


def live_samples(loss_weights: list[float] | None, idx: list[int]) -> torch.Tensor:
    """[B] 1.0 for the samples of ``idx`` whose loss weight is non-zero. A weight-0 sample (PACED's all-right
    or all-wrong problem, the quality gate) is as if filtered out: it joins no denominator and no
    selection."""
    if loss_weights is None:
        return torch.ones(len(idx))
    return torch.tensor([1.0 if loss_weights[i] != 0 else 0.0 for i in idx])


def keep_masks(entropy: list[torch.Tensor], divergence: list[torch.Tensor], valid: list[torch.Tensor],
               keep_ratio: float, mode: str, comm: Collective) -> list[torch.Tensor]:
    """TIP's kept tokens (``selection.select_tokens``) chosen once among the valid tokens of all micro-batches
    of every rank: each rank sees all ranks' scores (``Collective.cat``), makes the same choice and keeps its
    part."""
    valid_NT = _join(valid)
    h, start = comm.cat(_join(entropy).reshape(-1))
    d, _ = comm.cat(_join(divergence).reshape(-1))
    m, _ = comm.cat(valid_NT.reshape(-1))
    keep = select_tokens(h, d, m, keep_ratio, mode)
    return _split(keep[start : start + valid_NT.numel()].view(valid_NT.shape), valid)


def srpo_weights(teacher_entropy: list[torch.Tensor], sdpo_tokens: list[torch.Tensor], beta: float,
                 comm: Collective) -> list[torch.Tensor]:
    """exp(-beta*H_teacher) normalised to mean 1 over the whole batch's SDPO-routed tokens, all ranks'
    (§5.2)."""
    w_NT = entropy_weights(_join(teacher_entropy), _join(sdpo_tokens), beta=beta, sum_over_ranks=comm.sum,
                           max_over_ranks=comm.max)
    return _split(w_NT, sdpo_tokens)


def counted_tokens(mask_BT: torch.Tensor, live_B: torch.Tensor, keep_BT: torch.Tensor | None = None,
                   route_sdpo_B: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] the tokens of one micro-batch in the token-mean's denominator: TIP's kept tokens when it
    selects, else the live samples' tokens, and of those only the SDPO-routed ones when given (SDPO,
    §10.4)."""
    if keep_BT is not None:
        return keep_BT
    m = mask_BT * live_B.unsqueeze(-1)
    return m * route_sdpo_B.unsqueeze(-1) if route_sdpo_B is not None else m


def sequences(mask_BT: torch.Tensor, agg: str) -> float:
    """What a piece's ``aggregate`` divided by, to be undone before dividing by the batch's sequence count
    (``denominators``): one rule for a row without tokens, which no count includes. The per-sequence mean left
    it out already; Dr.GRPO's constant length divided by every row of the piece (an empty one adds nothing to
    the sum)."""
    if agg == "seq-mean-token-mean":
        return float((mask_BT.sum(-1) > 0).sum())
    return float(mask_BT.shape[0])


def denominators(counted: list[torch.Tensor], live: list[torch.Tensor],
                 comm: Collective) -> tuple[float, int]:
    """(tokens, sequences) of the whole batch, summed over ranks: each shard's loss is a share of the batch's.
    ``live``: [B] per micro-batch, 1 for each sample of the batch's sequence count (live, with tokens)."""
    local = [float(sum(c.sum() for c in counted)), float(sum(x.sum() for x in live))]
    tokens, seqs = comm.sum(torch.tensor(local, dtype=torch.float64)).tolist()
    return tokens or 1.0, int(seqs) or 1
