"""``opd eval``: greedy held-out accuracy of a student directory (any checkpoint's ``model/``) and the teacher."""

from __future__ import annotations

import ray

from opd.cluster import Roles, init_ray, start_teachers, start_verifiers
from opd.config import Config
from opd.preflight import check_inputs
from opd.rollout.worker import RolloutWorker
from opd.steps import evaluate


def evaluate_models(cfg: Config, teacher: bool = False) -> dict:
    cfg = cfg.model_copy(update={"algorithm": "opd" if teacher else cfg.algorithm})
    _, _, test = check_inputs(cfg)
    init_ray(cfg)
    common = {"seed": cfg.run.seed, "max_model_len": cfg.rollout.max_model_len, "kv_cache_gib": cfg.rollout.kv_cache_gib, "dtype": cfg.models.dtype}
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg.models.student, **common)
    teacher_actor = start_teachers(cfg, max_logprobs=1) if teacher else None
    roles = Roles([worker], teacher_actor, None, start_verifiers(cfg))
    result = {"student": cfg.models.student, "student_accuracy": evaluate(roles, test, cfg, who="student"), "eval_prompts": len(test)}
    if teacher:
        result.update(teacher=cfg.teacher.url or cfg.models.teacher, teacher_accuracy=evaluate(roles, test, cfg, who="teacher"))
    return result
