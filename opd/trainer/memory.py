"""The learner's activation memory, counted from the tensors autograd saves (``activation_mib`` in the
metrics)."""

from __future__ import annotations

import weakref

import torch


class ActivationMeter:
    """Peak bytes of the tensors autograd holds for backward during a learning pass: the learner's activation
    memory.

    A saved tensor counts from the moment autograd saves it until it is freed (its backward has run and let go
    of it), so computing the LM head and loss piece by piece shows as the lower peak it is. Deterministic on
    any device (unlike RSS on CPU), so memory effects such as token selection or shared prompts can be
    compared.
    """

    def __init__(self, weights=()) -> None:
        self.bytes = 0  # the peak
        self.live = 0
        # storage (pointer, size) -> saved tensors still holding it
        self._held: dict[tuple[int, int], int] = {}
        # Weights autograd saves (a matmul's backward reads them) are the model, not activations. A shard's
        # storage is its local slice; the whole weights FSDP2 gathers for a layer are parameters of their own
        # (``_is_weight``).
        self._weights = {(w.to_local() if hasattr(w, "to_local") else w).untyped_storage().data_ptr()
                         for w in weights}

    @staticmethod
    def _is_weight(t: torch.Tensor) -> bool:
        return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key[0] in self._weights or self._is_weight(t):
            return t
        if key not in self._held:
            self._held[key] = 0
            self.live += key[1]
            self.bytes = max(self.bytes, self.live)
        self._held[key] += 1
        # A detached alias, not ``t``: an op that saves its own output (log_softmax, exp) would otherwise hold
        # that output, whose grad_fn is the op's node holding it back, a cycle through C++ that no collector
        # sees. A branch of the graph that is never backpropagated (a log-prob only read detached) then leaked
        # every step.
        saved = t.detach()
        weakref.finalize(saved, self._release, key)
        return saved

    def _release(self, key: tuple[int, int]) -> None:
        self._held[key] -= 1
        if not self._held[key]:
            del self._held[key]
            self.live -= key[1]

    def __enter__(self) -> ActivationMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
