"""Config -> the plain values each role takes. Helpers never see the config tree (style rule 7)."""

from __future__ import annotations

from opd.config import Config
from opd.trainer.lora import LoraSpec
from opd.trainer.objective import ObjectiveSpec
from opd.trainer.objectives import get
from opd.trainer.routing import RoutePlan


def objective_spec(cfg: Config) -> ObjectiveSpec:
    g, o, sd = cfg.grpo, cfg.opd, cfg.sdpo
    objective = get(cfg.algorithm)
    tis = getattr(cfg, objective.tis_section).tis_cap  # the objective names the section (opd.py, exopd.py, ...)
    return ObjectiveSpec(
        name=cfg.algorithm,
        agg=g.loss_agg if objective.sequence_agg else "token-mean",
        clip_low=g.clip_low,
        clip_high=g.clip_high,
        tis_cap=tis,
        ratio=g.ratio,
        dual_clip=g.dual_clip,
        norm_len=cfg.rollout.max_new_tokens,
        opd_divergence=o.divergence,
        full_vocab_kind=o.full_vocab_kind,
        full_vocab_source=o.full_vocab_source,
        jsd_beta=o.jsd_beta,
        opd_kl_coef=o.kl_coef,
        exopd_lam=cfg.exopd.lam,
        opd_reward_kl_weight=cfg.opd_reward.kl_weight,
        opd_reward_reward_weight=cfg.opd_reward.reward_weight,
        kl_ref_coef=cfg.kl_ref.coef,
        kl_ref_kind=cfg.kl_ref.kind,
        sdpo_top_k=sd.top_k,
        sdpo_alpha=sd.alpha,
        sdpo_is_cap=sd.is_cap,
        sdpo_ema_rate=sd.ema_rate,
        srpo_entropy_beta=cfg.srpo.entropy_beta,
        select_mode=cfg.selection.mode,
        keep_ratio=cfg.selection.keep_ratio,
    )


def route_plan(cfg: Config) -> RoutePlan:
    w = cfg.weighting
    return RoutePlan(
        objective=cfg.algorithm,
        norm_by_std=cfg.grpo.norm_adv_by_std,
        adv_eps=cfg.grpo.adv_eps,
        signal=cfg.teacher_signal,
        paced=(w.paced_a, w.paced_b) if w.paced else None,
        quality_gate=w.quality_gate,
        drop_uniform_groups=w.drop_uniform_groups,
        success_threshold=cfg.sdpo.success_threshold,
        dont_reprompt_on_self_success=cfg.sdpo.dont_reprompt_on_self_success,
        max_reprompt_len=cfg.sdpo.max_reprompt_len,
    )


def learner_args(cfg: Config) -> dict:
    """The Learner's keyword arguments, but its device (``opd.trainer.device`` places each rank)."""
    t, lc = cfg.trainer, cfg.lora
    return dict(
        model_dir=cfg.models.student, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps, grad_clip=t.grad_clip, micro_batch_size=t.micro_batch_size,
        torch_threads=t.torch_threads, micro_batch_tokens=t.micro_batch_tokens, logits_chunk_tokens=t.logits_chunk_tokens,
        share_prompts=t.share_prompts, autocast=t.autocast, gradient_checkpointing=t.gradient_checkpointing,
        seed=cfg.run.seed, objective=objective_spec(cfg), reference_dir=cfg.reference_dir, teacher_dir=cfg.models.teacher,
        lora=LoraSpec(lc.r, lc.alpha, lc.dropout, tuple(lc.target_modules)),
    )
