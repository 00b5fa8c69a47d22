"""FSDP2 over learner ranks (``trainer.strategy: fsdp2``): each rank holds 1/N of every parameter, its
gradient and its AdamW state, and gathers a decoder layer's weights only while that layer runs.

``torch.distributed.fsdp.fully_shard`` is applied per decoder layer and once more to the model's ``Trunk``
(``opd.trainer.forward``), the root unit that owns what the layers do not: the embeddings, the final norm and
the LM head (tied to the embeddings or not). The learner runs the LM head piece by piece outside the trunk's
forward; this works because the root keeps its weights gathered from its forward until its backward (FSDP2's
default for the root), and the pieces' gradients land on those gathered weights before the root's backward
reduce-scatters them.

What the ranks must agree on, because every forward and backward through a sharded model is a collective:
the number of micro-batches per step (``pad_micro``: a rank with fewer repeats its last one with zero weight)
and every call that reads the whole model (weight export, the probe, checkpoints): rank 0 asks its peers to
make the same call (``Learner._collective``). Gradients are summed, not averaged, over ranks: each rank's loss
is already divided by the batch-wide denominator, as with replicas.

Checkpoints stay in the unsharded layout (``model/`` or ``adapter/`` as HF and PEFT save them,
``optimizer.pt`` keyed by parameter name): gathered on rank 0's CPU when saved, and each rank takes its own
shard of them when loaded, so a run saved with N ranks resumes with any number of ranks, sharded or not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

STRATEGIES = ("ddp", "fsdp2")  # trainer.strategy: replicas that all-reduce gradients, or FSDP2 shards


def shard(trunk: torch.nn.Module, device: torch.device) -> None:
    """Shard ``trunk`` (a ``Trunk``) over every rank of the default process group: one unit per decoder layer,
    the trunk as the root. The weights must be identical on every rank beforehand (each rank keeps its
    slice)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [*trunk.model.get_decoder().layers, trunk]
    for unit in units:
        fully_shard(unit, mesh=mesh)
        # Sum over ranks. Gloo has no pre-multiplied sum, so the reduction is a plain sum with the factor
        # applied outside the collective (a factor of 1: nothing to apply).
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def reshard(module: torch.nn.Module) -> None:
    """Free the root's gathered weights after forwards without a backward (frozen models, the probe, TIP's
    pass): FSDP2 keeps a root gathered after its forward, and its parameters then read as the full tensors."""
    if is_sharded(module):
        module.reshard()


def pad_micro(micro: list[list[int]], count: int) -> tuple[list[list[int]], int]:
    """``micro`` padded to ``count`` micro-batches by repeating its last one; (padded, number added). The
    repeats run with zero weight: they only make this rank join the forwards and backwards the other ranks
    run."""
    extra = count - len(micro)
    return micro + [micro[-1]] * extra, extra


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (empty on the others); a collective."""
    return get_model_state_dict(model, options=_FULL)


def optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """AdamW's state keyed by parameter name, whole tensors on rank 0's CPU (empty elsewhere); a collective
    when sharded. The same layout unsharded, so either kind of learner resumes from either."""
    return get_optimizer_state_dict(model, opt, options=_FULL)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """Every rank passes the whole state; each keeps its own slice. Returns the missing and unexpected
    keys."""
    return set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
