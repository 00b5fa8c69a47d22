"""The LM head applied to final hidden states the way the model's own forward applies it.

Learners and scorers run the decoder once and the head only where a score is needed (response positions, a
piece of a batch); this keeps their logits equal to ``model(...).logits`` at those positions, including the
post-head scaling some architectures apply (Gemma-style final-logit soft-capping, Cohere-style
``logit_scale``).
"""

from __future__ import annotations

import torch


def head_logits(head: torch.nn.Module, config, h: torch.Tensor) -> torch.Tensor:
    """``head(h)`` with the model config's post-head transforms (``head``: the model's output embedding)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    logits = head(h)
    scale = getattr(cfg, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
