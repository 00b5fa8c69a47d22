"""The learner's activation memory, counted from the tensors autograd saves (``activation_mib`` in the metrics)."""

from __future__ import annotations

import torch


class ActivationMeter:
    """Bytes of tensors autograd saves for backward during a forward pass: the learner's activation memory.

    Deterministic on any device (unlike RSS on CPU), so memory effects such as token selection can be compared.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += key[1]
        return t

    def __enter__(self) -> ActivationMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
