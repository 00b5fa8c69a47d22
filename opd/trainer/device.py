"""Where a learner process runs its tensors (``trainer.device``): the one place that turns the setting into a
device.

``auto`` means CUDA when this process sees a GPU, else the CPU. A Ray learner rank sees a GPU only when it
holds one (Ray hides the others), so ``opd.cluster`` decides whether a rank asks for one
(``learner_placement``) and hands the rank a concrete ``cpu`` or ``cuda``; a learner driven directly (tests,
benchmarks) resolves ``auto`` here. Torch only.
"""

from __future__ import annotations

import os

import torch

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class NoCudaError(RuntimeError):
    """``trainer.device=cuda`` where this process sees no GPU."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` where this process sees a GPU, else ``cpu``; ``cuda`` without one raises
    ``NoCudaError``."""
    if name not in DEVICES:
        raise ValueError(f"trainer.device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise NoCudaError(
            f"trainer.device=cuda, but this process sees no CUDA GPU (torch {torch.__version__}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "use trainer.device=auto or cpu, or run where a GPU is visible"
        )
    # The current CUDA device: Ray gives a GPU rank exactly one visible device, so this is the one it holds.
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def learner_placement(device: str, dist_backend: str, num_ranks: int,
                      cluster_gpus: float) -> tuple[str, bool]:
    """(the device each learner rank runs on, whether each rank asks Ray for one GPU) on a cluster with
    ``cluster_gpus`` GPUs. ``auto`` takes the GPUs when there is one per rank; NCCL collectives need a GPU
    even for a learner that keeps its tensors on the CPU (``opd.trainer.dist`` stages them there)."""
    if device == "auto":
        device = "cuda" if cluster_gpus >= num_ranks else "cpu"
    return device, device == "cuda" or dist_backend == "nccl"

