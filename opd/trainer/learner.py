"""The learner: holds the student, applies the routed objective with AdamW, exports weights.

Runs inside a Ray actor (placed by ``opd.cluster``) but imports torch and transformers only, so it can be
driven directly in tests or replayed on a dumped ``TrainBatch``. A step has two passes: a teacher-side pass
without gradient (reference model, HF teacher, SDPO self-teacher) that also fixes what depends on the whole
batch (``opd.trainer.batchwide``: denominators, SRPO's weights, TIP's kept tokens), then the learning pass
over micro-batches, whose gradients add up to the full-batch loss. Micro-batches hold a fixed count of
sequences or, with a token budget, length-sorted sequences within ``rows x longest`` tokens
(``opd.trainer.microbatch``).

Several ranks (``trainer.num_ranks``): ``opd.cluster`` starts one Learner per rank, joins them in a process
group and hands rank 0 the others' handles. Rank 0 stays the only learner the driver sees: ``train_step``
splits the batch into token-balanced shards, each rank trains one (``train_shard``), and the ranks meet in
collectives (``opd.trainer.dist``) for the batch-wide normalisers and the statistics. ``trainer.strategy``
says how they hold the model: ``fsdp2`` shards it (``opd.trainer.fsdp``: each rank 1/N of the weights,
gradients and AdamW state, and rank 0 asks its peers to join every call that reads the whole model), ``ddp``
keeps a full replica per rank and all-reduces the gradients. Either way every rank applies the same update.
With one rank the collectives are the identity and nothing is sharded.

Tensors live on ``device`` (``opd.trainer.device``: CUDA when the process sees a GPU under ``auto``): the
student and the teacher-side models are moved there once and each micro-batch's tensors are built on the CPU
and copied there; the weights and AdamW's state stay float32 (``trainer.autocast: bf16`` only changes the
forward's matmuls) and everything handed out (exported weights, the adapter, probe log-probs, checkpoints) is
on the CPU.

With a ``LoraSpec`` (``lora.r > 0``) the student is a PEFT model: only the adapter is trained, synced
(``export_adapter``) and checkpointed (``adapter/``, PEFT's format); the base weights stay as loaded.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import torch
from transformers import AutoTokenizer

from opd.metrics import RoleMetrics
from opd.rollout.weight_sync import TRANSFER, WeightBuckets, gather_only, whole
from opd.trainer import batchwide, fsdp, persist
from opd.trainer.chunks import per_piece, pieces
from opd.trainer.device import resolve_device
from opd.trainer.dist import Collective, free_port, join
from opd.trainer.forward import MicroTensors, Precision, Trunk, build_micro, flatten_kept, rows
from opd.trainer.lora import LoraSpec, adapter_files, trainable, wrap
from opd.trainer.losses import aggregate, entropy_from_logits, token_logprobs
from opd.trainer.memory import ActivationMeter
from opd.trainer.microbatch import padded_tokens, plan
from opd.trainer.objectives.loss import Aux, token_loss
from opd.trainer.objectives.spec import ObjectiveSpec
from opd.trainer.sdpo import ema_update
from opd.trainer.shards import balance_shards, shard_imbalance, take
from opd.trainer.stats import StepStats
from opd.trainer.teacher_side import TeacherSide, load_model
from opd.types import TrainBatch

log = logging.getLogger("opd.learner")


@dataclass
class _Shard:
    """One rank's shard of a step laid out: its micro-batches and what the whole batch fixed before they
    learn."""

    micro: list[list[int]]
    n_own: int  # the micro-batches whose statistics count (0 for a stand-in shard; padding ones come after)
    mts: list[MicroTensors]
    auxes: list[Aux]
    live: list[torch.Tensor]
    keeps: list[torch.Tensor | None]
    denom: float
    n_seqs: int
    base: StepStats  # positions, padding and the learner-side teacher KL, before any micro-batch ran


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
            # Non-reentrant: works with frozen inputs (LoRA) and keeps the RNG state, so the update is
            # unchanged.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # A shared prompt's cache is what checkpointing would recompute without: HF turns the cache off under
        # it.
        self.share_prompts = share_prompts and not gradient_checkpointing
        self.lora = lora if lora and lora.r > 0 else None
        if self.lora:
            self.model = wrap(self.model, self.lora, seed)
        # Moved after wrapping: the adapter is drawn on the CPU from the seed, so every device starts from the
        # same one.
        self.model.to(self.device)
        self.model.train()
        self.trunk = Trunk(self.model)  # every student forward goes through it (FSDP2's root unit)
        # saved with every checkpoint: model/ (or adapter/) loads alone
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.model.config.pad_token_id or 0
        self.adam = {"lr": lr, "betas": betas, "weight_decay": weight_decay}
        self.opt = self._optimizer()
        self.base_lr, self.warmup_steps, self.grad_clip = lr, warmup_steps, grad_clip
        self.micro_batch_size, self.micro_batch_tokens = micro_batch_size, micro_batch_tokens
        # LM head + loss in pieces of this many positions; 0: at once
        self.logits_chunk_tokens = logits_chunk_tokens
        self.fw = Precision(autocast)
        self.teachers = TeacherSide(self.spec, self.model, self.fw, self.pad_id, logits_chunk_tokens,
                                    reference_dir=reference_dir or model_dir, teacher_dir=teacher_dir,
                                    share_prompts=self.share_prompts, device=self.device)
        # not activations (ActivationMeter)
        self._weights = [*self.model.parameters(), *self.teachers.parameters()]
        self.steps_done = 0
        self.version = 0
        self.comm = Collective()  # one rank until join_group
        self.sharded = False  # FSDP2 over the ranks (join_group with strategy fsdp2)
        self.peers: list = []  # rank 0 of several: actor handles of ranks 1..N-1
        # in an actor named <job>/learner-<rank>: this rank's own series
        self.metrics = RoleMetrics("learner")

    def version_number(self) -> int:
        return self.version

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def free_port(self) -> int:
        """A free port on this rank's host: rank 0 hosts the process group's rendezvous store."""
        return free_port()

    def join_group(self, rank: int, world_size: int, host: str, port: int, backend: str,
                   strategy: str = "ddp") -> None:
        """Every rank calls this concurrently; it returns once all have joined (and, for fsdp2, sharded the
        student and its frozen models: every rank loaded identical ones, and each now keeps its slice)."""
        if strategy not in fsdp.STRATEGIES:
            raise ValueError(f"trainer.strategy must be one of {fsdp.STRATEGIES}, got {strategy!r}")
        self.comm = join(rank, world_size, host, port, backend)
        if strategy == "fsdp2" and world_size > 1:
            fsdp.shard(self.trunk, self.device)
            self.teachers.shard()
            # A shared-prompt forward runs the layers twice (prompts, then responses) and a plain one once, so
            # the ranks' micro-batches would differ in how many gathers they run: sharded, every row runs
            # whole.
            self.share_prompts = self.teachers.share_prompts = False
            self.opt = self._optimizer()  # over the shards; no step was taken yet
            self._weights = [*self.model.parameters(), *self.teachers.parameters()]
            self.sharded = True

    def _optimizer(self) -> torch.optim.AdamW:
        # Fused AdamW on CUDA: one kernel for every parameter's update; the CPU keeps torch's default
        # (bit-for-bit).
        fused = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(trainable(self.model), **self.adam, **fused)

    def _collective(self, method: str, *args) -> list:
        """Rank 0's side of a call that reads the whole sharded model (export, probe, checkpoint): the peers
        make the same call meanwhile, since its gathers and forwards are collectives. Replicas answer
        alone."""
        return [getattr(peer, method).remote(*args) for peer in self.peers] if self.sharded else []

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
        """Each micro-batch's SRPO entropy weights, from the self-teacher's entropy on its SDPO-routed
        tokens."""
        ent = [per_piece(lambda p, a=a: entropy_from_logits(a.teacher_head(p)), self._pieces(m))
               for a, m in zip(auxes, masks, strict=True)]
        sdpo = [(a.route_sdpo_B * x).unsqueeze(-1) * m for a, m, x in zip(auxes, masks, live, strict=True)]
        for a, w in zip(auxes, batchwide.srpo_weights(ent, sdpo, self.spec.entropy_beta, self.comm),
                        strict=True):
            a.entropy_weights_BT = w

    @torch.no_grad()
    def _keep_masks(self, batch: TrainBatch, micro: list[list[int]], mts: list[MicroTensors],
                    auxes: list[Aux], live: list[torch.Tensor]) -> list[torch.Tensor]:
        """TIP over the whole batch: the student's entropy (a forward without grad, before any micro-batch
        learns) and the sampled-token teacher divergence |log q - log pi_T|, ranked once over all
        micro-batches' tokens."""
        ent, div = [], []
        for idx, mt, a in zip(micro, mts, auxes, strict=True):
            h = self.fw.hidden(self.trunk, mt)
            ent.append(per_piece(lambda p, h=h: entropy_from_logits(self.fw.logits(self.model, h[p])),
                                 self._pieces(mt.mask_BT)))
            div.append((rows([batch.sampler_logprobs[i] for i in idx], mt.mask_BT.shape[1], self.device)
                        - a.teacher_logp_BT).abs())
        valid = [mt.mask_BT * x.unsqueeze(-1) for mt, x in zip(mts, live, strict=True)]
        return batchwide.keep_masks(ent, div, valid, self.spec.keep_ratio, self.spec.select_mode, self.comm)

    def _learn_micro(self, batch: TrainBatch, idx: list[int], mt: MicroTensors, aux: Aux,
                     keep: torch.Tensor | None, live: torch.Tensor, denom: float, n_seqs: int) -> StepStats:
        """Forward and backward of one micro-batch: the trunk once, then the LM head and the loss piece by
        piece (``opd.trainer.chunks``), each piece's backward into the trunk's output, then one backward
        through the trunk. A non-finite piece stops the micro-batch before its backward (the step will be
        skipped); sharded, the trunk's backward still runs (with what the pieces before it gave): it is a
        collective."""
        t_max = mt.mask_BT.shape[1]
        sampler_BT = rows([batch.sampler_logprobs[i] for i in idx], t_max, self.device)
        adv_BT = rows([batch.advantages[i] for i in idx], t_max, self.device)
        # 0 on a padding micro-batch (fsdp.pad_micro)
        weights_BT = live.unsqueeze(-1) * torch.ones_like(mt.mask_BT)
        if batch.loss_weights is not None:
            weights_BT = weights_BT * torch.tensor([batch.loss_weights[i] for i in idx],
                                                   device=self.device).unsqueeze(-1)
        h_BTH = self.fw.hidden(self.trunk, mt)
        targets_BT, mask_BT = mt.targets_BT, mt.mask_BT
        if keep is not None:
            h_BTH, targets_BT, mask_BT = (flatten_kept(h_BTH, keep), flatten_kept(targets_BT, keep),
                                          flatten_kept(mask_BT, keep))
            sampler_BT, adv_BT, weights_BT = (flatten_kept(sampler_BT, keep), flatten_kept(adv_BT, keep),
                                              flatten_kept(weights_BT, keep))
            for name in ("teacher_logp_BT", "ref_logp_BT", "topk_ids_BTK", "topk_logp_BTK"):
                if getattr(aux, name) is not None:
                    setattr(aux, name, flatten_kept(getattr(aux, name), keep))
        h_leaf = h_BTH.detach().requires_grad_(True)
        out = StepStats()
        for p in self._pieces(mask_BT, by_token=bool(self.spec.select_mode)):
            logits_BTV = self.fw.logits(self.model, h_leaf[p])
            loss_BT, count_BT = token_loss(self.spec, logits_BTV, targets_BT[p], mask_BT[p], sampler_BT[p],
                                           adv_BT[p], aux.piece(p))
            loss_BT = loss_BT * weights_BT[p]
            if self.spec.objective.sequence_agg and self.spec.agg != "token-mean":
                loss = aggregate(loss_BT, mask_BT[p], self.spec.agg,
                                 self.spec.norm_len) * batchwide.sequences(mask_BT[p], self.spec.agg) / n_seqs
            else:
                loss = loss_BT.sum() / denom
            if not torch.isfinite(loss.detach()):
                out = out.add(nonfinite=1.0)
                break
            loss.backward()
            with torch.no_grad():
                logp_BT = token_logprobs(logits_BTV, targets_BT[p])
                m = mask_BT[p]
                out = out.add(loss=float(loss),
                              entropy_sum=float((entropy_from_logits(logits_BTV) * m).sum()),
                              tokens=float(m.sum()), counted=float(count_BT.sum()))
                if m.any():
                    out = out.add(absdiff=float(((logp_BT - sampler_BT[p]).abs() * m).max()))
            del logits_BTV, loss_BT, loss
        if self.sharded:
            h_BTH.backward(h_leaf.grad if h_leaf.grad is not None else torch.zeros_like(h_BTH))
        elif out.finite and h_leaf.grad is not None:
            h_BTH.backward(h_leaf.grad)
        return out

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step over the whole batch. A non-finite loss or gradient on any rank skips it on all.

        Rank 0 of several sends each peer its token-balanced shard and trains its own meanwhile; the
        statistics it returns are the whole batch's (summed over ranks in ``train_shard``). Sharded, a rank
        left without samples (fewer samples than ranks) still runs the forwards: it trains the batch's first
        sample at weight 0.
        """
        batch.validate()
        parts, imbalance = self.shards(batch, 1 + len(self.peers))
        if self.peers:
            pending = [peer.train_shard.remote(*part)
                       for peer, part in zip(self.peers, parts[1:], strict=True)]
            stats = self.train_shard(*parts[0])
            _wait(pending)
        else:
            stats = self.train_shard(batch)
        return {**stats, "shard_token_imbalance": imbalance}

    def shards(self, batch: TrainBatch, ranks: int) -> tuple[list[tuple[TrainBatch, bool]], float]:
        """The batch's token-balanced shards, one per rank, each with whether it is a stand-in (an empty shard
        of a sharded learner: sample 0, run at weight 0), and their imbalance (max / mean tokens)."""
        lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)]
        idx = balance_shards(lengths, ranks)
        parts = [(take(batch, i), False) if i or not self.sharded
                 else (replace(take(batch, [0]), loss_weights=[0.0]), True)
                 for i in idx]
        return parts, shard_imbalance(lengths, idx)

    def train_shard(self, batch: TrainBatch, stand_in: bool = False) -> dict[str, float]:
        """This rank's forward/backward over its shard, then the update that every rank applies identically. A
        stand-in shard (``shards``) only joins the other ranks' forwards and backwards: it adds no
        statistics."""
        t0 = time.perf_counter()
        shard = self._lay_out(batch, stand_in)
        own = self._accumulate(batch, shard)
        self.teachers.reshard()
        fsdp.reshard(self.trunk)  # a padding micro-batch's or TIP's forward may have left the root gathered
        step = own.reduce(self.comm)  # the batch's: every rank then takes the same skip-or-step decision
        grad_norm, skipped, no_signal = self._apply(step.finite)
        seconds = time.perf_counter() - t0
        self.metrics.record(tokens=own.tokens, tokens_per_s=own.tokens / max(seconds, 1e-9),
                            activation_mib=own.activation_bytes / 2**20, version=self.version)
        return {**step.metrics(), "grad_norm": grad_norm, "update_skipped": float(skipped),
                "no_signal": float(no_signal), "lr": self._lr(),
                "train_seconds": seconds, "train_tokens_per_s": step.tokens / max(seconds, 1e-9)}

    def _lay_out(self, batch: TrainBatch, stand_in: bool) -> _Shard:
        """Micro-batches and their tensors, then what the whole batch fixes before any of them learns: SRPO's
        weights, TIP's kept tokens, the token and sequence denominators (``opd.trainer.batchwide``)."""
        lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)]
        micro = plan(lengths, self.micro_batch_size, self.micro_batch_tokens)
        n_own = 0 if stand_in else len(micro)  # the micro-batches whose statistics count
        if self.sharded:  # every rank runs as many forwards and backwards: the longest plan's count
            micro, _ = fsdp.pad_micro(micro, int(self.comm.max(torch.tensor(float(len(micro))))))
        pick = lambda xs, idx: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        mts = [build_micro(pick(batch.prompt_ids, idx), pick(batch.response_ids, idx), self.pad_id,
                           self.share_prompts, pick(batch.loss_mask, idx)).to(self.device) for idx in micro]
        auxes = [self.teachers.aux(batch, idx, mt) for idx, mt in zip(micro, mts, strict=True)]
        live = [batchwide.live_samples(batch.loss_weights, idx).to(self.device) * float(j < n_own)
                for j, idx in enumerate(micro)]
        objective = self.spec.objective
        if objective.entropy_weighted:
            self._srpo_weights(auxes, [mt.mask_BT for mt in mts], live)
        keeps = (self._keep_masks(batch, micro, mts, auxes, live) if self.spec.select_mode
                 else [None] * len(micro))
        counted = [batchwide.counted_tokens(mt.mask_BT, x, k,
                                            a.route_sdpo_B if objective.routed_denominator else None)
                   for mt, x, k, a in zip(mts, live, keeps, auxes, strict=True)]
        with_tokens = [x * (mt.mask_BT.sum(-1) > 0) for mt, x in zip(mts, live, strict=True)]
        denom, n_seqs = batchwide.denominators(counted, with_tokens, self.comm)
        kl_sum, kl_tokens = self._teacher_kl(batch, micro[:n_own], mts[:n_own], auxes[:n_own])
        base = StepStats(real_positions=float(sum(lengths) * (not stand_in)),
                         padded_positions=float(padded_tokens(lengths, micro[:n_own])), kl_sum=kl_sum,
                         kl_tokens=kl_tokens)
        return _Shard(micro, n_own, mts, auxes, live, keeps, denom, n_seqs, base)

    def _accumulate(self, batch: TrainBatch, shard: _Shard) -> StepStats:
        """Every micro-batch's forward and backward; gradients add up to the whole batch's loss."""
        own = shard.base
        self.opt.zero_grad(set_to_none=True)
        for j, (idx, mt, aux, keep, x) in enumerate(zip(shard.micro, shard.mts, shard.auxes, shard.keeps,
                                                        shard.live, strict=True)):
            with ActivationMeter(weights=self._weights) as meter:
                got = self._learn_micro(batch, idx, mt, aux, keep, x, shard.denom, shard.n_seqs)
            own = own.add(activation_bytes=float(meter.bytes))
            if not got.finite:
                own = own.add(nonfinite=1.0)
                if self.sharded:
                    continue  # the other ranks' forwards and backwards still need this one's
                break
            if j < shard.n_own:
                own = own.add(loss=got.loss, entropy_sum=got.entropy_sum, tokens=got.tokens,
                              counted=got.counted, absdiff=got.absdiff)
        return own

    def _apply(self, finite: bool) -> tuple[float, bool, bool]:
        """Clip and step, or skip on every rank a non-finite step or one without signal (a zero gradient);
        (grad norm, skipped, skipped for want of signal)."""
        if finite and not self.sharded:
            self.comm.sum_grads(trainable(self.model))  # identical gradients -> identical clipping and step
        # Sharded, the backward already summed each shard's gradient over the ranks, and the norm spans them
        # too.
        grad_norm = (float(whole(torch.nn.utils.clip_grad_norm_(trainable(self.model), self.grad_clip)))
                     if finite else math.nan)
        skipped, no_signal = not (finite and math.isfinite(grad_norm)), False
        if skipped:
            log.warning("non-finite loss or gradient at learner step %d: update skipped", self.steps_done)
        elif grad_norm == 0.0:
            # No token carried a signal (every advantage or weight 0: a GRPO group that all failed, PACED's
            # agreeing groups). AdamW would still move every weight on its momentum: on SmolLM2 one rewarded
            # GRPO step followed by such steps took a 10 % student to 0 %, PACED's held-out KL from 0.7 to 10.
            log.info("no training signal at learner step %d: update skipped", self.steps_done)
            skipped = no_signal = True
        if skipped:
            self.opt.zero_grad(set_to_none=True)
            return grad_norm, True, no_signal
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        self.opt.step()
        if self.teachers.self_teacher is not None:
            # Pairs by position; with LoRA only the adapter moves, so only it is averaged.
            pairs = [(t, s) for t, s in zip(self.teachers.self_teacher.parameters(), self.model.parameters(),
                                            strict=True)
                     if s.requires_grad]
            ema_update([t for t, _ in pairs], [s for _, s in pairs],
                       rate=self.spec.self_teacher_settings.ema_rate)
        self.steps_done += 1
        self.version += 1
        return grad_norm, False, False

    def _teacher_kl(self, batch: TrainBatch, micro: list[list[int]], mts: list[MicroTensors],
                    auxes: list[Aux]) -> tuple[float, float]:
        """(sum, tokens) of the sampled-token KL log q - log pi_T when this learner ran the teacher (then no
        teacher actor scored the batch, and the driver's ``teacher_kl`` comes from here)."""
        if self.teachers.hf_teacher is None:
            return 0.0, 0.0
        parts = [((rows([batch.sampler_logprobs[i] for i in idx], mt.mask_BT.shape[1], self.device)
                   - a.teacher_logp_BT) * mt.mask_BT).sum()
                 for idx, mt, a in zip(micro, mts, auxes, strict=True)]
        return float(sum(parts)), float(sum(mt.mask_BT.sum() for mt in mts))

    @torch.no_grad()
    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probs of tokens 1..n of a fixed sequence; compared against the engines after each sync."""
        pending = self._collective("probe_logprobs", token_ids)
        mt = build_micro([token_ids[:1]], [token_ids[1:]], self.pad_id).to(self.device)
        self.model.eval()  # the engines run without LoRA dropout
        try:
            logits = self.fw.logits(self.model, self.trunk(mt))
        finally:
            self.model.train()
            fsdp.reshard(self.trunk)
        _wait(pending)
        return token_logprobs(logits, mt.targets_BT)[0].tolist()

    def uses_lora(self) -> bool:
        return self.lora is not None

    def export_weights(self) -> WeightBuckets | None:
        """The student's weights published for the engines (``weight_sync.TRANSFER``: Ray's object store, in
        buckets). Sharded, each tensor is gathered as its bucket fills (every rank joins; only rank 0
        publishes)."""
        if self.sharded and self.comm.rank != 0:  # a peer's part: the gathers only
            return gather_only(self.model.state_dict())
        pending = self._collective("export_weights")
        handle = TRANSFER.publish(self.model.state_dict())
        _wait(pending)
        return handle

    def export_adapter(self) -> dict[str, bytes]:
        """The adapter's files (PEFT format) for the engines: a few MB where ``export_weights`` sends the
        model."""
        if self.lora is None:
            raise RuntimeError(
                "export_adapter: this learner trains every weight (lora.r = 0); use export_weights")
        pending = self._collective("export_adapter")
        files = adapter_files(self.model)
        _wait(pending)
        return files

    def save(self, path: str) -> None:
        """Write a checkpoint (``opd.trainer.persist``); sharded, every rank gathers and rank 0 writes."""
        pending = self._collective("save", path)
        persist.save(self, path)
        _wait(pending)

    def load(self, path: str) -> None:
        """Restore a checkpoint. Rank 0 of several restores every rank from the same files (storage all nodes
        see, as the run directory already must be), so weights, optimizer and self-teacher stay identical
        across ranks."""
        pending = [peer.load.remote(path) for peer in self.peers]
        persist.load(self, path)
        _wait(pending)


def _wait(pending: list) -> None:
    """Wait for peers' calls and re-raise their errors. Ray is imported only here: only rank 0 of several,
    itself a Ray actor, calls other actors; a single learner (and every test that drives one directly) never
    gets here."""
    if not pending:
        return
    import ray

    ray.get(pending)
