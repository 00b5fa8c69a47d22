"""``opd eval``: greedy held-out accuracy of a student directory (any checkpoint's ``model/``) and the
teacher.

    opd eval runs/demo/config.yaml models.student=runs/demo/checkpoints/step_000040/model --teacher

The engines start as a run's do (``opd.cluster``), so ``rollout.engine`` and ``teacher.engine`` choose them
here too.
"""

from __future__ import annotations

from opd.cluster import Roles, init_ray, start_rollout_worker, start_teachers, start_verifiers, stop_roles
from opd.config import Config
from opd.models.hub import resolve_models
from opd.preflight import check_inputs
from opd.steps import evaluate


def evaluate_models(cfg: Config, teacher: bool = False) -> dict:
    # models.student is evaluated as it is (no adapter is loaded): its engine needs no LoRA slot.
    cfg = resolve_models(cfg)[0].model_copy(update={"lora": cfg.lora.model_copy(update={"r": 0})})
    _, _, test = check_inputs(cfg, teacher=teacher)
    init_ray(cfg)
    roles = None
    try:
        roles = Roles([start_rollout_worker(cfg, 0)],
                      start_teachers(cfg, max_logprobs=1) if teacher else None, None, start_verifiers(cfg))
        result = {"student": cfg.models.student,
                  "student_accuracy": evaluate(roles, test, cfg, who="student"),
                  "eval_prompts": len(test)}
        if teacher:
            result.update(teacher=cfg.teacher.url or cfg.models.teacher,
                          teacher_accuracy=evaluate(roles, test, cfg, who="teacher"))
        return result
    finally:
        stop_roles(roles)
