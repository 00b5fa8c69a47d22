"""The learner: holds the student, applies the routed objective with AdamW, exports weights.

Runs inside a Ray actor (placed by ``opd.cluster``) but imports torch and transformers only, so it can be driven
directly in tests or replayed on a dumped ``TrainBatch``. A step has two passes: a teacher-side pass without
gradient (reference model, HF teacher, SDPO self-teacher) that also fixes what depends on the whole batch
(``opd.trainer.batchwide``: denominators, SRPO's weights, TIP's kept tokens), then the learning pass over
micro-batches, whose gradients add up to the full-batch loss. Micro-batches hold a fixed count of
sequences or, with a token budget, length-sorted sequences within ``rows x longest`` tokens (``opd.trainer.microbatch``).

Several ranks (``trainer.num_ranks``): ``opd.cluster`` starts one Learner per rank, joins them in a process group
and hands rank 0 the others' handles. Rank 0 stays the only learner the driver sees: ``train_step`` splits the
batch into token-balanced shards, each rank trains one (``train_shard``), and the ranks meet in collectives
(``opd.trainer.dist``) for the batch-wide normalisers, the gradient sum and the statistics, so every rank applies
the same update and the weights stay identical. With one rank the collectives are the identity.

Tensors live on ``device`` (``opd.trainer.device``: CUDA when the process sees a GPU under ``auto``): the student
and the teacher-side models are moved there once and each micro-batch's tensors are built on the CPU and copied
there; the weights and AdamW's state stay float32 (``trainer.autocast: bf16`` only changes the forward's matmuls) and
everything handed out (exported weights, the adapter, probe log-probs, checkpoints) is on the CPU.

With a ``LoraSpec`` (``lora.r > 0``) the student is a PEFT model: only the adapter is trained, synced
(``export_adapter``) and checkpointed (``adapter/``, PEFT's format); the base weights stay as loaded.
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
from transformers import AutoTokenizer

from opd.monitor.ray_metrics import RoleMetrics
from opd.rollout.weight_sync import TRANSFER, WeightBuckets
from opd.trainer import batchwide
from opd.trainer.chunks import per_piece, pieces
from opd.trainer.device import resolve_device
from opd.trainer.dist import Collective, free_port, join
from opd.trainer.forward import MicroTensors, Precision, build_micro, flatten_kept, rows
from opd.trainer.lora import LoraSpec, adapter_files, load_adapter_weights, trainable, wrap
from opd.trainer.losses import aggregate, entropy_from_logits, token_logprobs
from opd.trainer.memory import ActivationMeter
from opd.trainer.microbatch import padded_tokens, plan
from opd.trainer.objective import Aux, ObjectiveSpec, token_loss
from opd.trainer.sdpo import ema_update
from opd.trainer.shards import balance_shards, shard_imbalance, take
from opd.trainer.stats import StepStats
from opd.trainer.teacher_side import TeacherSide, load_model
from opd.types import TrainBatch

log = logging.getLogger("opd.learner")


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
        micro_batch_tokens: int = 0,
        logits_chunk_tokens: int = 1024,
        share_prompts: bool = True,
        autocast: str = "off",
        gradient_checkpointing: bool = False,
        torch_threads: int = 1,
        seed: int = 0,
        objective: ObjectiveSpec | None = None,
        reference_dir: str | None = None,
        teacher_dir: str | None = None,
        lora: LoraSpec | None = None,
        device: str = "auto",
    ) -> None:
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.device = resolve_device(device)
        self.spec = objective or ObjectiveSpec()
        self.model = load_model(model_dir)
        if gradient_checkpointing:
            # Non-reentrant: works with frozen inputs (LoRA) and keeps the RNG state, so the update is unchanged.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # A shared prompt's cache is what checkpointing would recompute without: HF turns the cache off under it.
        self.share_prompts = share_prompts and not gradient_checkpointing
        self.lora = lora if lora and lora.r > 0 else None
        if self.lora:
            self.model = wrap(self.model, self.lora, seed)
        # Moved after wrapping: the adapter is drawn on the CPU from the seed, so every device starts from the same one.
        self.model.to(self.device)
        self.model.train()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)  # saved with every checkpoint: model/ (or adapter/) loads alone
        self.pad_id = self.model.config.pad_token_id or 0
        # Fused AdamW on CUDA: one kernel for every parameter's update; the CPU keeps torch's default (bit-for-bit).
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(trainable(self.model), lr=lr, betas=betas, weight_decay=weight_decay, **fused)
        self.base_lr, self.warmup_steps, self.grad_clip = lr, warmup_steps, grad_clip
        self.micro_batch_size, self.micro_batch_tokens = micro_batch_size, micro_batch_tokens
        self.logits_chunk_tokens = logits_chunk_tokens  # LM head + loss in pieces of this many positions; 0: at once
        self.fw = Precision(autocast)
        self.teachers = TeacherSide(self.spec, self.model, self.fw, self.pad_id, logits_chunk_tokens,
                                    reference_dir=reference_dir or model_dir, teacher_dir=teacher_dir,
                                    share_prompts=self.share_prompts, device=self.device)
        self._weights = [*self.model.parameters(), *self.teachers.parameters()]  # not activations (ActivationMeter)
        self.steps_done = 0
        self.version = 0
        self.comm = Collective()  # one rank until join_group
        self.peers: list = []  # rank 0 of several: actor handles of ranks 1..N-1
        self.metrics = RoleMetrics("learner")  # in an actor named <job>/learner-<rank>: this rank's own series

    def version_number(self) -> int:
        return self.version

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def free_port(self) -> int:
        """A free port on this rank's host: rank 0 hosts the process group's rendezvous store."""
        return free_port()

    def join_group(self, rank: int, world_size: int, host: str, port: int, backend: str) -> None:
        """Every rank calls this concurrently; it returns once all have joined."""
        self.comm = join(rank, world_size, host, port, backend)

    def set_peers(self, peers: list) -> None:
        """Rank 0 only: the handles of ranks 1..N-1, which train the other shards of each batch."""
        self.peers = list(peers)

    def _lr(self) -> float:
        if self.warmup_steps and self.steps_done < self.warmup_steps:
            return self.base_lr * (self.steps_done + 1) / self.warmup_steps
        return self.base_lr

    def _pieces(self, mask_BT: torch.Tensor, by_token: bool = False) -> list[tuple]:
        return pieces(mask_BT.shape[0], mask_BT.shape[1], self.logits_chunk_tokens, by_token)

    def _srpo_weights(self, auxes: list[Aux], masks: list[torch.Tensor], live: list[torch.Tensor]) -> None:
        """Each micro-batch's SRPO entropy weights, from the self-teacher's entropy on its SDPO-routed tokens."""
        ent = [per_piece(lambda p, a=a: entropy_from_logits(a.teacher_head(p)), self._pieces(m)) for a, m in zip(auxes, masks, strict=True)]
        sdpo = [(a.route_sdpo_B * x).unsqueeze(-1) * m for a, m, x in zip(auxes, masks, live, strict=True)]
        for a, w in zip(auxes, batchwide.srpo_weights(ent, sdpo, self.spec.srpo_entropy_beta, self.comm), strict=True):
            a.entropy_weights_BT = w

    @torch.no_grad()
    def _keep_masks(self, batch: TrainBatch, micro: list[list[int]], mts: list[MicroTensors], auxes: list[Aux],
                    live: list[torch.Tensor]) -> list[torch.Tensor]:
        """TIP over the whole batch: the student's entropy (a forward without grad, before any micro-batch learns)
        and the sampled-token teacher divergence |log q - log pi_T|, ranked once over all micro-batches' tokens."""
        ent, div = [], []
        for idx, mt, a in zip(micro, mts, auxes, strict=True):
            h = self.fw.hidden(self.model, mt)
            ent.append(per_piece(lambda p, h=h: entropy_from_logits(self.fw.logits(self.model, h[p])), self._pieces(mt.mask_BT)))
            div.append((rows([batch.sampler_logprobs[i] for i in idx], mt.mask_BT.shape[1], self.device) - a.teacher_logp_BT).abs())
        valid = [mt.mask_BT * x.unsqueeze(-1) for mt, x in zip(mts, live, strict=True)]
        return batchwide.keep_masks(ent, div, valid, self.spec.keep_ratio, self.spec.select_mode)

    def _learn_micro(self, batch: TrainBatch, idx: list[int], mt: MicroTensors, aux: Aux, keep: torch.Tensor | None,
                     denom: float, n_seqs: int) -> dict:
        """Forward and backward of one micro-batch: the trunk once, then the LM head and the loss piece by piece
        (``opd.trainer.chunks``), each piece's backward into the trunk's output, then one backward through the
        trunk. A non-finite piece stops the micro-batch before its backward (the step will be skipped)."""
        t_max = mt.mask_BT.shape[1]
        sampler_BT = rows([batch.sampler_logprobs[i] for i in idx], t_max, self.device)
        adv_BT = rows([batch.advantages[i] for i in idx], t_max, self.device)
        weights_BT = torch.ones_like(mt.mask_BT)
        if batch.loss_weights is not None:
            weights_BT = weights_BT * torch.tensor([batch.loss_weights[i] for i in idx], device=self.device).unsqueeze(-1)
        h_BTH = self.fw.hidden(self.model, mt)
        targets_BT, mask_BT = mt.targets_BT, mt.mask_BT
        if keep is not None:
            h_BTH, targets_BT, mask_BT = flatten_kept(h_BTH, keep), flatten_kept(targets_BT, keep), flatten_kept(mask_BT, keep)
            sampler_BT, adv_BT, weights_BT = flatten_kept(sampler_BT, keep), flatten_kept(adv_BT, keep), flatten_kept(weights_BT, keep)
            for name in ("teacher_logp_BT", "ref_logp_BT", "topk_ids_BTK", "topk_logp_BTK"):
                if getattr(aux, name) is not None:
                    setattr(aux, name, flatten_kept(getattr(aux, name), keep))
        h_leaf = h_BTH.detach().requires_grad_(True)
        out = {"loss": 0.0, "entropy_sum": 0.0, "tokens": 0.0, "counted": 0.0, "absdiff": 0.0, "finite": True}
        for p in self._pieces(mask_BT, by_token=bool(self.spec.select_mode)):
            logits_BTV = self.fw.logits(self.model, h_leaf[p])
            loss_BT, count_BT = token_loss(self.spec, logits_BTV, targets_BT[p], mask_BT[p], sampler_BT[p], adv_BT[p], aux.piece(p))
            loss_BT = loss_BT * weights_BT[p]
            if self.spec.objective.sequence_agg and self.spec.agg != "token-mean":
                loss = aggregate(loss_BT, mask_BT[p], self.spec.agg, self.spec.norm_len) * loss_BT.shape[0] / n_seqs
            else:
                loss = loss_BT.sum() / denom
            if not torch.isfinite(loss.detach()):
                out["finite"] = False
                return out
            loss.backward()
            with torch.no_grad():
                logp_BT = token_logprobs(logits_BTV, targets_BT[p])
                m = mask_BT[p]
                out["loss"] += float(loss)
                out["entropy_sum"] += float((entropy_from_logits(logits_BTV) * m).sum())
                out["tokens"] += float(m.sum())
                out["counted"] += float(count_BT.sum())
                if m.any():
                    out["absdiff"] = max(out["absdiff"], float(((logp_BT - sampler_BT[p]).abs() * m).max()))
            del logits_BTV, loss_BT, loss
        if h_leaf.grad is not None:
            h_BTH.backward(h_leaf.grad)
        return out

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step over the whole batch. A non-finite loss or gradient on any rank skips it on all.

        Rank 0 of several sends each peer its token-balanced shard and trains its own meanwhile; the statistics
        it returns are the whole batch's (summed over ranks in ``train_shard``).
        """
        batch.validate()
        lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)]
        shards = balance_shards(lengths, 1 + len(self.peers))
        if self.peers:
            pending = [peer.train_shard.remote(take(batch, idx)) for peer, idx in zip(self.peers, shards[1:], strict=True)]
            stats = self.train_shard(take(batch, shards[0]))
            _wait(pending)
        else:
            stats = self.train_shard(batch)
        return {**stats, "shard_token_imbalance": shard_imbalance(lengths, shards)}

    def train_shard(self, batch: TrainBatch) -> dict[str, float]:
        """This rank's forward/backward over its shard, then the update that every rank applies identically."""
        t0 = time.perf_counter()
        lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)]
        micro = plan(lengths, self.micro_batch_size, self.micro_batch_tokens)
        mts = [build_micro([batch.prompt_ids[i] for i in idx], [batch.response_ids[i] for i in idx], self.pad_id,
                           self.share_prompts).to(self.device) for idx in micro]
        auxes = [self.teachers.aux(batch, idx, mt) for idx, mt in zip(micro, mts, strict=True)]
        live = [batchwide.live_samples(batch.loss_weights, idx).to(self.device) for idx in micro]
        if self.spec.objective.entropy_weighted:
            self._srpo_weights(auxes, [mt.mask_BT for mt in mts], live)
        keeps = self._keep_masks(batch, micro, mts, auxes, live) if self.spec.select_mode else [None] * len(micro)
        denom_tokens = [batchwide.counted_tokens(mt.mask_BT, x, k, a.route_sdpo_B if self.spec.objective.routed_denominator else None)
                        for mt, x, k, a in zip(mts, live, keeps, auxes, strict=True)]
        denom, n_seqs = batchwide.denominators(denom_tokens, live, self.comm)
        kl_sum, kl_tokens = self._teacher_kl(batch, micro, mts, auxes)
        own = StepStats(real_positions=float(sum(lengths)), padded_positions=float(padded_tokens(lengths, micro)),
                        kl_sum=kl_sum, kl_tokens=kl_tokens)
        self.opt.zero_grad(set_to_none=True)
        for idx, mt, aux, keep in zip(micro, mts, auxes, keeps, strict=True):
            with ActivationMeter(weights=self._weights) as meter:
                out = self._learn_micro(batch, idx, mt, aux, keep, denom, n_seqs)
            own = own.add(activation_bytes=float(meter.bytes))
            if not out["finite"]:
                own = own.add(nonfinite=1.0)
                break
            own = own.add(loss=out["loss"], entropy_sum=out["entropy_sum"], tokens=out["tokens"], counted=out["counted"],
                          absdiff=out["absdiff"])
        step = own.reduce(self.comm)  # the batch's: every rank then takes the same skip-or-step decision
        finite = step.finite
        if finite:
            self.comm.sum_grads(trainable(self.model))  # identical gradients -> identical clipping and step
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable(self.model), self.grad_clip)) if finite else math.nan
        skipped = not (finite and math.isfinite(grad_norm))
        if skipped:
            log.warning("non-finite loss or gradient at learner step %d: update skipped", self.steps_done)
            self.opt.zero_grad(set_to_none=True)
        else:
            for group in self.opt.param_groups:
                group["lr"] = self._lr()
            self.opt.step()
            if self.teachers.self_teacher is not None:
                # Pairs by position; with LoRA only the adapter moves, so only it is averaged.
                pairs = [(t, s) for t, s in zip(self.teachers.self_teacher.parameters(), self.model.parameters(), strict=True) if s.requires_grad]
                ema_update([t for t, _ in pairs], [s for _, s in pairs], rate=self.spec.sdpo_ema_rate)
            self.steps_done += 1
            self.version += 1
        seconds = time.perf_counter() - t0
        self.metrics.record(tokens=own.tokens, tokens_per_s=own.tokens / max(seconds, 1e-9),
                            activation_mib=own.activation_bytes / 2**20, version=self.version)
        return {**step.metrics(), "grad_norm": grad_norm, "update_skipped": float(skipped), "lr": self._lr(),
                "train_seconds": seconds, "train_tokens_per_s": step.tokens / max(seconds, 1e-9)}

    def _teacher_kl(self, batch: TrainBatch, micro: list[list[int]], mts: list[MicroTensors], auxes: list[Aux]) -> tuple[float, float]:
        """(sum, tokens) of the sampled-token KL log q - log pi_T when this learner ran the teacher (then no teacher
        actor scored the batch, and the driver's ``teacher_kl`` comes from here)."""
        if self.teachers.hf_teacher is None:
            return 0.0, 0.0
        parts = [((rows([batch.sampler_logprobs[i] for i in idx], mt.mask_BT.shape[1], self.device) - a.teacher_logp_BT) * mt.mask_BT).sum()
                 for idx, mt, a in zip(micro, mts, auxes, strict=True)]
        return float(sum(parts)), float(sum(mt.mask_BT.sum() for mt in mts))

    @torch.no_grad()
    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probs of tokens 1..n of a fixed sequence; compared against the engines after each sync."""
        ids = torch.tensor([token_ids], device=self.device)
        self.model.eval()  # the engines run without LoRA dropout
        try:
            logits = self.model(input_ids=ids).logits[:, :-1]
        finally:
            self.model.train()
        return token_logprobs(logits, ids[:, 1:])[0].tolist()

    def uses_lora(self) -> bool:
        return self.lora is not None

    def export_weights(self) -> WeightBuckets:
        """The student's weights published for the engines (``weight_sync.TRANSFER``: Ray's object store, in buckets)."""
        return TRANSFER.publish(self.model.state_dict())

    def export_adapter(self) -> dict[str, bytes]:
        """The adapter's files (PEFT format) for the engines: a few MB where ``export_weights`` sends the model."""
        if self.lora is None:
            raise RuntimeError("export_adapter: this learner trains every weight (lora.r = 0); use export_weights")
        return adapter_files(self.model)

    def save(self, path: str) -> None:
        out = Path(path)
        # With LoRA only the adapter is saved (its config names the base model): PeftModel.from_pretrained loads it.
        weights = out / ("adapter" if self.lora else "model")
        self.model.save_pretrained(weights)
        self.tokenizer.save_pretrained(weights)
        # CPU tensors in every file, so a checkpoint resumes on any device (``load`` maps it to this one).
        torch.save(_cpu(self.opt.state_dict()), out / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":  # LoRA dropout on CUDA draws from the device's generator
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, out / "rng.pt")
        if self.teachers.self_teacher is not None:
            torch.save(_cpu(self.teachers.self_teacher.state_dict()), out / "self_teacher.pt")
        (out / "learner.json").write_text(json.dumps({"steps_done": self.steps_done, "version": self.version}))

    def load(self, path: str) -> None:
        """Restore a checkpoint. Rank 0 of several restores every rank from the same files (storage all nodes see, as
        the run directory already must be), so weights, optimizer and self-teacher stay identical across ranks."""
        pending = [peer.load.remote(path) for peer in self.peers]
        src = Path(path)
        if self.lora:
            load_adapter_weights(self.model, src / "adapter")
        else:
            self.model.load_state_dict(load_model(str(src / "model")).state_dict())
        self.opt.load_state_dict(torch.load(src / "optimizer.pt", map_location=self.device, weights_only=False))
        rng = torch.load(src / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.teachers.self_teacher is not None:
            self.teachers.self_teacher.load_state_dict(torch.load(src / "self_teacher.pt", map_location=self.device, weights_only=True))
        meta = json.loads((src / "learner.json").read_text())
        self.steps_done, self.version = meta["steps_done"], meta["version"]
        if pending:
            _wait(pending)


def _cpu(state):
    """A (nested) state dict with its tensors on the CPU; on the CPU the very same tensors."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu(v) for v in state)
    return state


def _wait(pending: list) -> None:
    """Wait for peers' calls and re-raise their errors. Ray is imported only here: only rank 0 of several, itself a
    Ray actor, calls other actors; a single learner (and every test that drives one directly) never gets here."""
    import ray

    ray.get(pending)
