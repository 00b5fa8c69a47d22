"""Moving student weights from the learner into a running vLLM engine.

Weights travel as one serialized blob (``collective_rpc`` would turn tensors in its arguments into nested lists)
and are loaded with the worker's own in-place ``reload_weights``, which runs every layer's weight loader; calling
the model's ``load_weights`` directly fails on CPU. The extension method is deliberately not called
``update_weights``: vLLM's native weight-transfer API owns that name.
"""

from __future__ import annotations

import io

import torch


def pack_state_dict(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, buf)
    return buf.getvalue()


def unpack_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


class WeightReceiverExtension:
    """Mixed into vLLM's worker class through ``LLM(worker_extension_cls=...)``."""

    def opd_receive_weights(self, blob: bytes) -> int:
        state = unpack_state_dict(blob)
        # HF checkpoints with tied embeddings carry lm_head.weight too; vLLM's loader skips what it ties.
        self.reload_weights(weights_iterator=iter(state.items()))  # type: ignore[attr-defined]
        return len(state)
