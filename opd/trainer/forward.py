"""Learner-side tensors for a micro-batch, and a forward pass that only pays for the positions it scores.

The LM head runs on the hidden states of response positions only (never on prompt positions), so the
``[N, V]`` logits tensor, which dominates memory at real vocabulary sizes, covers exactly the tokens a loss
uses; with token selection (TIP) the head runs on the kept tokens only (``flatten_kept``).

``Precision`` runs the forward under bf16 autocast when asked (``trainer.autocast``): the weights stay float32
(the optimizer's master copy), matmuls run in bf16, and the logits come back as float32 so every loss
(log-softmax, logsumexp, divergences) is computed in float32 outside autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from opd.models.head import head_logits
from opd.models.prefix import SharedPrompts, share_prompts, shared_response_hidden


@dataclass
class MicroTensors:
    """Right-padded ``prompt+response`` ids; per response token, the position whose output predicts it."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    pos_BT: torch.Tensor  # [B, T] index into L of the logit predicting response token t
    targets_BT: torch.Tensor  # [B, T] response token ids
    mask_BT: torch.Tensor  # [B, T] 1 on real response tokens
    # the same rows with each distinct prompt run once (trainer.share_prompts)
    shared: SharedPrompts | None = None

    def to(self, device: torch.device) -> MicroTensors:
        """The micro-batch on ``device``: built on the CPU row by row, then copied once per tensor (not per
        row)."""
        return replace(self, input_ids=self.input_ids.to(device),
                       attention_mask=self.attention_mask.to(device),
                       pos_BT=self.pos_BT.to(device), targets_BT=self.targets_BT.to(device),
                       mask_BT=self.mask_BT.to(device),
                       shared=self.shared.to(device) if self.shared is not None else None)


def build_micro(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                share: bool = False, loss_masks: list[list[int]] | None = None) -> MicroTensors:
    """``loss_masks``: episodes' per-token masks (``TrainBatch.loss_mask``); ``mask_BT`` is every objective's
    token mask, so environment and template tokens leave the loss, its denominators, TIP and the KL alike."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(len(s) for s in seqs)
    t_max = max(max((len(r) for r in response_ids), default=0), 1)
    b = len(seqs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    pos_BT = torch.zeros((b, t_max), dtype=torch.long)
    targets_BT = torch.zeros((b, t_max), dtype=torch.long)
    mask_BT = torch.zeros((b, t_max))
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        n = len(r)
        input_ids[i, : len(p) + n] = torch.tensor(p + r)
        attn[i, : len(p) + n] = 1
        # Response token t sits at len(p)+t and is predicted by the output at len(p)-1+t. A teacher prompt of
        # a different length (SDPO) still lines up because only these positions are read.
        pos_BT[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        targets_BT[i, :n] = torch.tensor(r, dtype=torch.long)
        mask_BT[i, :n] = 1.0 if loss_masks is None else torch.tensor(loss_masks[i], dtype=torch.float32)
    shared = share_prompts(prompt_ids, response_ids, pad_id) if share else None
    return MicroTensors(input_ids, attn, pos_BT, targets_BT, mask_BT, shared)


def rows(values: list[list[float]], t_max: int, device: torch.device | None = None,
         fill: float = 0.0) -> torch.Tensor:
    """Ragged per-token floats -> [B, T] float32 padded with ``fill``, on ``device`` (filled on the CPU,
    copied once)."""
    out = torch.full((len(values), t_max), fill)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out if device is None else out.to(device)


def topk_tensors(ids: list[list[list[int]]], logprobs: list[list[list[float]]],
                 t_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged top-k rows ``[B][T_b][K_bt]`` -> ids ``[B, T, K]``, log-probs ``[B, T, K]`` and ``[B, T]`` 1
    where a position has a row. A short row is padded with its own first id at log-prob -1e4 (no teacher
    mass: the divergence is unchanged, and the student's rest bucket still leaves that id out once); an empty
    one with id 0."""
    k = max([len(r) for seq in ids for r in seq] + [1])
    ids_BTK = torch.zeros(len(ids), t_max, k, dtype=torch.long)
    lps_BTK = torch.full((len(ids), t_max, k), -1e4)
    has_BT = torch.zeros(len(ids), t_max)
    for b, (seq, seq_lp) in enumerate(zip(ids, logprobs, strict=True)):
        for t, (row, row_lp) in enumerate(zip(seq, seq_lp, strict=True)):
            if row:
                ids_BTK[b, t] = row[0]
                ids_BTK[b, t, : len(row)] = torch.tensor(row)
                lps_BTK[b, t, : len(row)] = torch.tensor(row_lp)
                has_BT[b, t] = 1.0
    return ids_BTK, lps_BTK, has_BT


def response_hidden(model, mt: MicroTensors) -> torch.Tensor:
    """Final hidden states at the response-predicting positions, [B, T, H]; with ``mt.shared`` each distinct
    prompt runs once and its sequences' responses read its cache (``opd.models.prefix``)."""
    if mt.shared is not None:
        return shared_response_hidden(model.get_decoder(), mt.shared)
    # No KV cache: a training forward never decodes, and HF would otherwise build one (and warn under
    # checkpointing).
    hidden = model.get_decoder()(input_ids=mt.input_ids, attention_mask=mt.attention_mask,
                                 use_cache=False).last_hidden_state
    return hidden.gather(1, mt.pos_BT.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


class Trunk(torch.nn.Module):
    """A causal LM up to the response positions' final hidden states (``response_hidden``), as a module of its
    own.

    Learners run every forward through one, so that under FSDP2 (``opd.trainer.fsdp``) it is the root unit
    whose forward gathers the weights the decoder layers do not hold: embeddings, final norm, LM head.
    Unsharded it is only the call. Its parameters are the model's, in the model's order."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, mt: MicroTensors) -> torch.Tensor:
        return response_hidden(self.model, mt)


def flatten_kept(t_BT: torch.Tensor, keep_BT: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [1, N, ...] over the kept tokens: token-level losses then run on N tokens only."""
    return t_BT[keep_BT.bool()].unsqueeze(0)


@dataclass
class Precision:
    """The learner's forward: hidden states and float32 logits, under bf16 autocast when ``mode ==
    "bf16"``."""

    mode: str = "off"  # trainer.autocast

    def __post_init__(self) -> None:
        if self.mode not in ("off", "bf16"):
            raise ValueError(f"trainer.autocast must be 'off' or 'bf16', got {self.mode!r}")

    def _ctx(self, model):
        if self.mode == "off":
            return contextlib.nullcontext()
        # The device the weights live on: autocast on a device the tensors are not on would do nothing.
        return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)

    def hidden(self, trunk: Trunk, mt: MicroTensors) -> torch.Tensor:
        with self._ctx(trunk):
            return trunk(mt)

    def logits(self, model, h: torch.Tensor) -> torch.Tensor:
        return self.head(model.get_output_embeddings(), model.config, h)

    def head(self, head: torch.nn.Module, config, h: torch.Tensor) -> torch.Tensor:
        """An LM head on its own (a teacher's, applied to hidden states its actor sent), float32 logits."""
        with self._ctx(head):
            out = head_logits(head, config, h)
        return out.float()
