"""The models a learner step reads besides the student, none of which gets a gradient: the ExOPD reference,
the full-vocabulary teacher (the whole model, or only its LM head when its actor sends hidden states), the
SDPO self-teacher; and ``aux``, which turns them and the batch's teacher scores into a micro-batch's ``Aux``.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from opd.trainer import fsdp
from opd.trainer.chunks import per_piece, pieces
from opd.trainer.forward import MicroTensors, Precision, Trunk, build_micro, rows, topk_tensors
from opd.trainer.losses import token_logprobs
from opd.trainer.objectives import SELF_TEACHER_ROUTE
from opd.trainer.objectives.loss import Aux
from opd.trainer.objectives.spec import ObjectiveSpec
from opd.types import TrainBatch


def load_model(model_dir: str, device: torch.device | None = None) -> torch.nn.Module:
    """Float32 weights (the optimizer's master copy, or a teacher's at the student's precision) on
    ``device``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model if device is None else model.to(device)


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class TeacherSide:
    def __init__(self, spec: ObjectiveSpec, student: torch.nn.Module, fw: Precision, pad_id: int,
                 chunk_tokens: int, *, reference_dir: str, teacher_dir: str | None,
                 share_prompts: bool = False, device: torch.device | None = None):
        self.fw, self.pad_id, self.chunk_tokens, self.share_prompts = fw, pad_id, chunk_tokens, share_prompts
        self.device = device or torch.device("cpu")
        # Whole models run as trunks (their LM heads piece by piece), so FSDP2 can shard them as it shards the
        # student.
        self.reference = (Trunk(frozen(load_model(reference_dir, self.device)))
                          if spec.needs_reference else None)
        self.hf_teacher = (Trunk(frozen(load_model(teacher_dir, self.device)))
                           if spec.needs_hf_teacher else None)
        # With the teacher's trunk in its own actor, only its LM head lives here (the rest of the model is
        # freed, never copied to the device).
        teacher = load_model(teacher_dir) if spec.needs_teacher_head else None
        self.teacher_head = (frozen(teacher.get_output_embeddings().to(self.device))
                             if teacher is not None else None)
        self.teacher_config = teacher.config if teacher is not None else None
        del teacher
        self.self_teacher = Trunk(frozen(copy.deepcopy(student))) if spec.needs_self_teacher else None

    def trunks(self) -> list[Trunk]:
        return [t for t in (self.reference, self.hf_teacher, self.self_teacher) if t is not None]

    def parameters(self) -> list[torch.Tensor]:
        return [p for m in (*self.trunks(), self.teacher_head) if m is not None for p in m.parameters()]

    def shard(self) -> None:
        """FSDP2 over the learner ranks, as the student: each holds 1/N of every frozen model. The teacher
        head (an LM head alone, read piece by piece on every rank) stays whole."""
        for t in self.trunks():
            fsdp.shard(t, self.device)

    def reshard(self) -> None:
        """After a step: their forwards had no backward, so their roots are still gathered
        (``fsdp.reshard``)."""
        for t in self.trunks():
            fsdp.reshard(t)

    @torch.no_grad()
    def aux(self, batch: TrainBatch, idx: list[int], mt: MicroTensors) -> Aux:
        """The micro-batch ``idx``'s teacher-side tensors: the batch's teacher scores as tensors, and the
        forwards of the reference, HF teacher or self-teacher (their LM heads run later, piece by piece, in
        ``Aux.piece``)."""
        t_max = mt.mask_BT.shape[1]
        aux = Aux()
        if batch.teacher_logprobs is not None:
            aux.teacher_logp_BT = rows([batch.teacher_logprobs[i] for i in idx], t_max, self.device)
        if batch.teacher_chunks is not None:
            aux.chunk_BT = rows([batch.teacher_chunks[i] for i in idx], t_max, self.device, -1).long()
        if batch.teacher_topk_ids is not None:
            ids, lps, has = topk_tensors([batch.teacher_topk_ids[i] for i in idx],
                                         [batch.teacher_topk_logprobs[i] for i in idx], t_max)
            aux.topk_ids_BTK, aux.topk_logp_BTK = ids.to(self.device), lps.to(self.device)
            # a teacher of another tokenizer gives rows at chunk starts only
            aux.topk_rows_BT = has.to(self.device) if batch.teacher_chunks is not None else None
        # full_vocab_source=teacher: the teacher's actor sent its hidden states
        if self.teacher_head is not None:
            if batch.teacher_hidden is None:
                raise ValueError("opd.full_vocab_source=teacher: the batch carries no teacher hidden states")
            t_h = torch.zeros(len(idx), t_max, batch.teacher_hidden[idx[0]].shape[1])
            for j, i in enumerate(idx):
                t_h[j, : batch.teacher_hidden[i].shape[0]] = torch.as_tensor(batch.teacher_hidden[i])
            t_h = t_h.to(self.device)
            aux.teacher_head = lambda p: self.fw.head(self.teacher_head, self.teacher_config, t_h[p])
        if self.reference is not None:
            ref_h = self.fw.hidden(self.reference, mt)
            aux.ref_logp_BT = per_piece(
                lambda p: token_logprobs(self.fw.logits(self.reference.model, ref_h[p]), mt.targets_BT[p]),
                pieces(mt.mask_BT.shape[0], mt.mask_BT.shape[1], self.chunk_tokens))
        if self.hf_teacher is not None:
            # [B, T, H]: the teacher's logits are made piece by piece
            t_h = self.fw.hidden(self.hf_teacher, mt)
            aux.teacher_head = lambda p: self.fw.logits(self.hf_teacher.model, t_h[p])
            if aux.teacher_logp_BT is None:  # no teacher actor scored the batch: this forward is the teacher
                aux.teacher_logp_BT = per_piece(
                    lambda p: token_logprobs(aux.teacher_head(p), mt.targets_BT[p]),
                    pieces(mt.mask_BT.shape[0], mt.mask_BT.shape[1], self.chunk_tokens))
        if self.self_teacher is not None:
            # The self-teacher reads the same response after its own (re-written) prompt.
            prompts = [batch.teacher_prompt_ids[i] or batch.prompt_ids[i] for i in idx]
            tmt = build_micro(prompts, [batch.response_ids[i] for i in idx], self.pad_id,
                              self.share_prompts).to(self.device)
            s_h = self.fw.hidden(self.self_teacher, tmt)
            aux.teacher_head = lambda p: self.fw.logits(self.self_teacher.model, s_h[p])
            aux.route_sdpo_B = torch.tensor(
                [1.0 if batch.routes[i] == SELF_TEACHER_ROUTE else 0.0 for i in idx], device=self.device)
        return aux

