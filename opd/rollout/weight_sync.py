"""Moving student weights from the learner into running engines, behind one ``WeightTransfer`` interface.

The backend used today is Ray's shared-memory object store (``ObjectStoreTransfer``): the learner puts its
tensors as numpy arrays in buckets of about ``bucket_bytes`` (never one pickled blob of the whole model); an
engine on the same node maps them zero-copy and copies each straight into its parameters, an engine on another
node gets them by Ray's object transfer. A tensor that shares storage with another (a tied LM head) travels
once and is handed to the engine under both names. The handle (``WeightBuckets``) is a small typed record of
ObjectRefs and metadata that the driver forwards without touching the bytes, and that a replacement worker can
be given again.

Engines take the tensors through the worker's own in-place ``reload_weights`` (``WeightReceiverExtension``),
which runs every layer's weight loader (fusing q/k/v and gate/up as the engine stores them); calling the
model's
``load_weights`` directly fails on CPU. The extension method is deliberately not called ``update_weights``:
vLLM's native weight-transfer API owns that name, and is what GPU backends of this interface will use: an
engine started with ``LLM(weight_transfer_config=WeightTransferConfig(backend="nccl"))`` (or ``"ipc"`` when
colocated), whose workers expose ``init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` /
``finish_weight_update`` (``vllm/v1/worker/gpu_worker.py``), fed by the trainer-side
``NCCLTrainerWeightTransferEngine`` of ``vllm/distributed/weight_transfer/nccl_engine.py`` (``ipc_engine.py``
for CUDA IPC). Ray is imported inside the backend only: the learner module stays importable without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch.distributed.tensor import DTensor

DEFAULT_BUCKET_BYTES = 64 << 20
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a LoRA adapter as PEFT saves it


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WeightBuckets:
    """A published set of weights: per bucket an ObjectRef of ``{name: uint8 array}`` and its tensors'
    metadata."""

    refs: list
    metas: list[list[TensorMeta]]
    # name sent -> other names sharing its storage
    aliases: dict[str, list[str]] = field(default_factory=dict)
    nbytes: int = 0

    def __len__(self) -> int:
        return sum(len(m) for m in self.metas) + sum(len(a) for a in self.aliases.values())


class WeightTransfer(Protocol):
    def publish(self, state: dict[str, torch.Tensor]) -> WeightBuckets: ...

    def receive(self, handle: WeightBuckets) -> Iterator[tuple[str, torch.Tensor]]: ...


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a shard of an FSDP2 learner (a DTensor) is gathered from every rank, so every rank
    calls this for the same tensors in the same order; any other tensor is itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_only(state: dict[str, torch.Tensor]) -> None:
    """A peer rank's side of ``publish`` under FSDP2: the same gathers in the same order, nothing kept."""
    for t in _dedupe(state)[0].values():
        whole(t)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Tensors that are views of the same storage (tied embeddings) once, and the other names of each; a
    shard's storage is its local slice."""
    first: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, list[str]] = {}
    for name, t in state.items():
        local = t.to_local() if isinstance(t, DTensor) else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape), t.dtype)
        if key in first:
            aliases.setdefault(first[key], []).append(name)
        else:
            first[key] = name
            unique[name] = t
    return unique, aliases


class ObjectStoreTransfer:
    """Buckets of tensors through Ray's object store; zero-copy reads on the same node."""

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.bucket_bytes = bucket_bytes

    def publish(self, state: dict[str, torch.Tensor]) -> WeightBuckets:
        import ray

        unique, aliases = _dedupe(state)
        refs, metas, bucket, meta, size, total = [], [], {}, [], 0, 0
        for name, t in unique.items():
            # gathered one tensor at a time: a bucket at most is held
            t = whole(t).detach().to("cpu").contiguous()
            # As raw bytes: numpy has no bfloat16, and the receiver views them back as the recorded dtype.
            bucket[name] = t.view(-1).view(torch.uint8).numpy()
            meta.append(TensorMeta(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                refs.append(ray.put(bucket))
                metas.append(meta)
                total, bucket, meta, size = total + size, {}, [], 0
        if bucket:
            refs.append(ray.put(bucket))
            metas.append(meta)
            total += size
        return WeightBuckets(refs, metas, aliases, total)

    def receive(self, handle: WeightBuckets) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs, one bucket mapped at a time; the tensors are read-only views of the object
        store."""
        import ray

        for ref, metas in zip(handle.refs, handle.metas, strict=True):
            arrays = ray.get(ref)
            for m in metas:
                with warnings.catch_warnings():  # the view is read-only, and is only ever read
                    warnings.simplefilter("ignore", UserWarning)
                    raw = torch.from_numpy(arrays[m.name])
                t = raw.view(getattr(torch, m.dtype)).view(m.shape)
                yield m.name, t
                for alias in handle.aliases.get(m.name, ()):
                    yield alias, t


@dataclass(frozen=True)
class LocalWeights:
    """A published set of weights that never left the learner's process (``cluster.colocate``): the learner's
    own tensors, each unique storage once, and the other names of each."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, list[str]] = field(default_factory=dict)


class InPlaceTransfer:
    """The colocated backend: the engine in the learner's process reads the learner's tensors directly, one at
    a time, and copies each into its own parameters (no serialisation, no object store). One unsharded
    learner only (``cluster.colocate`` refuses several ranks)."""

    def publish(self, state: dict[str, torch.Tensor]) -> LocalWeights:
        unique, aliases = _dedupe(state)
        return LocalWeights(unique, aliases)

    def receive(self, handle: LocalWeights) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in handle.tensors.items():
            t = t.detach()
            yield name, t
            for alias in handle.aliases.get(name, ()):
                yield alias, t


TRANSFER = ObjectStoreTransfer()  # the backend this process uses (CPU placement: the object store)
IN_PLACE = InPlaceTransfer()  # cluster.colocate: the learner's tensors, read where they are


def receive(handle: WeightBuckets | LocalWeights) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a published set, read by the backend that published it."""
    return IN_PLACE.receive(handle) if isinstance(handle, LocalWeights) else TRANSFER.receive(handle)


class WeightReceiverExtension:
    """Mixed into vLLM's worker class through ``LLM(worker_extension_cls=...)``. The engine runs in the
    actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the iterator is handed over as it is, never
    serialised."""

    def opd_receive_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        # HF checkpoints with tied embeddings carry lm_head.weight too; vLLM's loader skips what it ties.
        self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]


def write_adapter(files: dict[str, bytes], directory: Path) -> Path:
    """Write a LoRA adapter's files (what the learner exports) into ``directory`` (created), complete before
    the caller hands it to vLLM."""
    missing = [n for n in ADAPTER_FILES if n not in files]
    if missing:
        raise ValueError(f"adapter is missing {missing}; got {sorted(files)}")
    directory.mkdir(parents=True, exist_ok=False)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory
