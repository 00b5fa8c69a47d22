"""Config -> the plain values each role takes. Helpers never see the config tree (style rule 7)."""

from __future__ import annotations

from opd.config import Config
from opd.trainer.lora import LoraSpec
from opd.trainer.objectives import REGISTRY
from opd.trainer.objectives.spec import ObjectiveSpec
from opd.trainer.routing import RoutePlan


def objective_spec(cfg: Config) -> ObjectiveSpec:
    """The learner's view of ``cfg``'s objective: every objective section as the config holds it, and the
    values all objectives share."""
    return ObjectiveSpec(
        name=cfg.algorithm,
        sections={name: cfg.section(name) for name, o in REGISTRY.items() if o.section is not None},
        norm_len=cfg.rollout.max_new_tokens,
        kl_ref_coef=cfg.kl_ref.coef,
        kl_ref_kind=cfg.kl_ref.kind,
        select_mode=cfg.selection.mode,
        keep_ratio=cfg.selection.keep_ratio,
    )


def route_plan(cfg: Config) -> RoutePlan:
    w = cfg.weighting
    return RoutePlan(
        objective=cfg.algorithm,
        signal=cfg.teacher_signal,
        paced=(w.paced_a, w.paced_b) if w.paced else None,
        quality_gate=w.quality_gate,
        drop_uniform_groups=w.drop_uniform_groups,
        **objective_spec(cfg).route_settings(),
    )


def learner_args(cfg: Config) -> dict:
    """The Learner's keyword arguments, but its device (``opd.trainer.device`` places each rank)."""
    t, lc = cfg.trainer, cfg.lora
    return dict(
        model_dir=cfg.models.student, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps, grad_clip=t.grad_clip, micro_batch_size=t.micro_batch_size,
        torch_threads=t.torch_threads, micro_batch_tokens=t.micro_batch_tokens,
        logits_chunk_tokens=t.logits_chunk_tokens,
        share_prompts=t.share_prompts, autocast=t.autocast, gradient_checkpointing=t.gradient_checkpointing,
        seed=cfg.run.seed, objective=objective_spec(cfg), reference_dir=cfg.reference_dir,
        teacher_dir=cfg.models.teacher,
        lora=LoraSpec(lc.r, lc.alpha, lc.dropout, tuple(lc.target_modules)),
    )


def spec_of(*overrides: str) -> ObjectiveSpec:
    """``objective_spec`` of the default config with ``key=value`` overrides, for replays, benchmarks and
    tests:
    ``spec_of("algorithm=exopd", "exopd.lam=1.0")``."""
    from opd.config import load_config

    return objective_spec(load_config(None, list(overrides)))
