"""Collectives across learner ranks (torch.distributed, gloo or NCCL), and the identity when there is one
rank.

The learner calls the same methods whatever the number of ranks. With one rank no process group exists and
every reduction returns its input, so a single learner runs exactly the code it always ran. With several, each
rank trains its own shard and the ranks meet here: batch-wide counts (denominators, normalisers), gradients,
statistics. Torch only; the rendezvous address comes from ``opd.cluster``, which knows where the ranks were
placed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist


class Collective:
    """Sum / max over ranks of small tensors, and the gradient all-reduce.

    Every rank must make the same calls in the same order (they are collectives): code paths that differ per
    rank, such as a rank with an empty shard, still call with tensors of the same shape.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        # NCCL reduces CUDA tensors only; the learner's tensors may live on the CPU, so they are staged there.
        self.device = device or torch.device("cpu")

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.world_size == 1:
            return t
        buf = t.detach().to(self.device, copy=True)  # a copy: callers keep their local values
        dist.all_reduce(buf, op=op)
        return buf.to(t.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def cat(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every rank's 1-D ``t`` joined in rank order (lengths may differ), and where this rank's part
        starts."""
        if self.world_size == 1:
            return t, 0
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([t.numel()], device=self.device))
        sizes = [int(x) for x in sizes]
        buf = torch.zeros(max(sizes), dtype=t.dtype, device=self.device)
        buf[: t.numel()] = t.detach()
        parts = [torch.empty_like(buf) for _ in sizes]
        dist.all_gather(parts, buf)
        joined = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(t.device)
        return joined, sum(sizes[: self.rank])

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every trainable parameter's gradient by its sum over ranks, in one flat all-reduce.

        Each rank's loss was already divided by the batch-wide denominator, so the sum is the full-batch
        gradient. A parameter without a gradient on this rank (an empty shard) contributes zeros.
        """
        if self.world_size == 1:
            return
        params = [p for p in params if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        flat = self.sum(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.device)
            offset += p.numel()


def free_port() -> int:
    """A TCP port free on this host now, for rank 0's rendezvous store (the usual bind-to-0 race is
    accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def resolve_backend(name: str) -> str:
    """``auto`` -> NCCL where this process sees a GPU, else gloo (CPU)."""
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if name not in ("gloo", "nccl"):
        raise ValueError(f"unknown dist backend {name!r}; valid: auto, gloo, nccl")
    return name


def join(rank: int, world_size: int, host: str, port: int, backend: str,
         timeout_s: float = 1800.0) -> Collective:
    """Join the learners' process group; returns once all ``world_size`` ranks have called it.

    ``timeout_s`` bounds every later collective too: a rank whose peer died mid-step fails after it instead of
    hanging (gloo notices a closed connection sooner).
    """
    backend = resolve_backend(backend)
    # a second learner in a process already in the group (tests/fsdp_ranks.py) shares it
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"this process is rank {dist.get_rank()} of {dist.get_world_size()}, "
                               f"not {rank} of {world_size}")
    else:
        dist.init_process_group(
            backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s)
        )
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Collective(rank, world_size, device)
