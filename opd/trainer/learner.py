"""The learner: holds the student, applies the routed objective with AdamW, exports weights.

Runs inside a Ray actor (``LearnerActor`` in ``opd.cluster``) but imports torch and transformers only, so it can be
driven directly in tests or replayed on a dumped ``TrainBatch``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from opd.rollout.weight_sync import pack_state_dict
from opd.trainer.losses import clipped_pg_loss, entropy_from_logits, token_logprobs, truncated_is_weights
from opd.types import TrainBatch

log = logging.getLogger("opd.learner")


def _batch_tensors(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int):
    """Right-padded ``prompt+response`` ids and, per response token, the index of the logit that predicts it."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(len(s) for s in seqs)
    t_max = max(max((len(r) for r in response_ids), default=0), 1)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    pos_BT = torch.zeros((len(seqs), t_max), dtype=torch.long)
    targets_BT = torch.zeros((len(seqs), t_max), dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), t_max))
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
        n = len(r)
        pos_BT[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        targets_BT[i, :n] = torch.tensor(r, dtype=torch.long)
        mask_BT[i, :n] = 1.0
    return input_ids, attn, pos_BT, targets_BT, mask_BT


def _rows(values: list[list[float]], t_max: int) -> torch.Tensor:
    out = torch.zeros(len(values), t_max)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


class Learner:
    def __init__(
        self,
        model_dir: str,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        grad_clip: float = 1.0,
        micro_batch_size: int = 64,
        torch_threads: int = 1,
        seed: int = 0,
        loss_kwargs: dict | None = None,
    ) -> None:
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.train()
        self.pad_id = self.model.config.pad_token_id or 0
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.base_lr = lr
        self.warmup_steps = warmup_steps
        self.grad_clip = grad_clip
        self.micro_batch_size = micro_batch_size
        self.loss_kwargs = loss_kwargs or {}
        self.steps_done = 0
        self.version = 0

    def version_number(self) -> int:
        return self.version

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _lr(self) -> float:
        if self.warmup_steps and self.steps_done < self.warmup_steps:
            return self.base_lr * (self.steps_done + 1) / self.warmup_steps
        return self.base_lr

    def _micro_loss(self, batch: TrainBatch, idx: list[int], tis_cap: float):
        input_ids, attn, pos_BT, targets_BT, mask_BT = _batch_tensors(
            [batch.prompt_ids[i] for i in idx], [batch.response_ids[i] for i in idx], self.pad_id
        )
        logits = self.model(input_ids=input_ids, attention_mask=attn).logits
        logits_BTV = logits.gather(1, pos_BT.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        logp_BT = token_logprobs(logits_BTV, targets_BT)
        t_max = pos_BT.shape[1]
        sampler_BT = _rows([batch.sampler_logprobs[i] for i in idx], t_max)
        adv_BT = _rows([batch.advantages[i] for i in idx], t_max)
        weights_BT = truncated_is_weights(logp_BT, sampler_BT, tis_cap)
        if batch.loss_weights is not None:
            weights_BT = weights_BT * torch.tensor([batch.loss_weights[i] for i in idx]).unsqueeze(-1)
        kw = {k: v for k, v in self.loss_kwargs.items() if k != "tis_cap"}
        loss, stats = clipped_pg_loss(logp_BT, logp_BT.detach(), adv_BT, mask_BT, token_weights_BT=weights_BT, **kw)
        with torch.no_grad():
            ent = entropy_from_logits(logits_BTV)
            stats["entropy_sum"] = float((ent * mask_BT).sum())
            stats["learner_sampler_absdiff_max"] = float(((logp_BT - sampler_BT).abs() * mask_BT).max()) if mask_BT.any() else 0.0
        return loss, stats, mask_BT

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step over the whole batch, accumulating gradients over micro-batches.

        A non-finite loss or gradient skips the update: weights and optimizer state stay as they were.
        """
        batch.validate()
        t0 = time.perf_counter()
        tis_cap = float(self.loss_kwargs.get("tis_cap", 2.0))
        agg = self.loss_kwargs.get("agg", "token-mean")
        n_seq, n_tok = len(batch.uids), max(1, batch.num_tokens)
        self.opt.zero_grad(set_to_none=True)
        total_loss, ent_sum, clip_sum, absdiff = 0.0, 0.0, 0.0, 0.0
        finite = True
        for start in range(0, n_seq, self.micro_batch_size):
            idx = list(range(start, min(start + self.micro_batch_size, n_seq)))
            loss, stats, mask_BT = self._micro_loss(batch, idx, tis_cap)
            mb_tokens = float(mask_BT.sum())
            # Scale so the accumulated gradient equals the full-batch aggregation.
            scale = mb_tokens / n_tok if agg == "token-mean" else (1.0 if agg == "token-sum" else len(idx) / n_seq)
            if not torch.isfinite(loss):
                finite = False
                break
            (loss * scale).backward()
            total_loss += float(loss) * scale
            ent_sum += stats["entropy_sum"]
            clip_sum += stats["clip_frac"] * mb_tokens
            absdiff = max(absdiff, stats["learner_sampler_absdiff_max"])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)) if finite else math.nan
        skipped = not (finite and math.isfinite(grad_norm))
        if skipped:
            log.warning("non-finite loss or gradient at learner step %d: update skipped", self.steps_done)
            self.opt.zero_grad(set_to_none=True)
        else:
            for group in self.opt.param_groups:
                group["lr"] = self._lr()
            self.opt.step()
            self.steps_done += 1
            self.version += 1
        seconds = time.perf_counter() - t0
        return {
            "loss": total_loss if finite else math.nan,
            "grad_norm": grad_norm,
            "entropy": ent_sum / n_tok,
            "clip_frac": clip_sum / n_tok,
            "learner_sampler_absdiff_max": absdiff,
            "update_skipped": float(skipped),
            "lr": self._lr(),
            "train_tokens": float(batch.num_tokens),
            "train_seconds": seconds,
            "train_tokens_per_s": batch.num_tokens / max(seconds, 1e-9),
        }

    @torch.no_grad()
    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probs of tokens 1..n of a fixed sequence; compared against the engines after each sync."""
        ids = torch.tensor([token_ids])
        logits = self.model(input_ids=ids).logits[:, :-1]
        return token_logprobs(logits, ids[:, 1:])[0].tolist()

    def export_weights(self) -> bytes:
        return pack_state_dict(self.model.state_dict())

    def save(self, path: str) -> None:
        out = Path(path)
        self.model.save_pretrained(out / "model")
        torch.save(self.opt.state_dict(), out / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}, out / "rng.pt")
        (out / "learner.json").write_text(json.dumps({"steps_done": self.steps_done, "version": self.version}))

    def load(self, path: str) -> None:
        src = Path(path)
        loaded = AutoModelForCausalLM.from_pretrained(src / "model", dtype=torch.float32)
        self.model.load_state_dict(loaded.state_dict())
        self.opt.load_state_dict(torch.load(src / "optimizer.pt", weights_only=False))
        rng = torch.load(src / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        meta = json.loads((src / "learner.json").read_text())
        self.steps_done, self.version = meta["steps_done"], meta["version"]
