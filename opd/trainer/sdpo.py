"""SDPO, self-distillation policy optimisation (``reference/algorithms.md`` §3): the same model, shown a
successful sibling rollout and/or environment feedback, re-scores the student's own rollout and the student
distils it.

Two halves, both pure: building the self-teacher's prompt text from one group of rollouts (plain Python lists,
§3.1), and the per-token loss over tensors (torch only, §3.2–3.3). Shapes: ``B`` sequences, ``T`` padded
response length, ``V`` vocabulary. Tested in ``tests/test_objectives.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from opd.trainer.divergences import student_topk_divergence
from opd.trainer.losses import truncated_is_weights

# Non-greedy and dot-all so each <think> block goes separately, newlines included, with its trailing
# whitespace.
_THINK_RE = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


@dataclass(frozen=True)
class RepromptTemplates:
    """SDPO-ref ``actor.yaml`` defaults (YAML ``|-`` blocks: no trailing newline), filled with
    ``str.format``."""

    reprompt: str = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
    solution: str = "\nCorrect solution:\n\n{successful_previous_attempt}"
    feedback: str = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"


# The name the trainer brief uses; same class.
ReprompTemplates = RepromptTemplates


class TeacherContext(NamedTuple):
    """What the self-teacher sees beyond the prompt for one rollout; at least one field is set."""

    solution: str | None
    feedback: str | None


def strip_thinking(text: str) -> str:
    """Delete every ``<think>…</think>`` block (§3.1 step 2, ``remove_thinking_from_demonstration``)."""
    return _THINK_RE.sub("", text)


def build_reprompt(
    prompt_text: str,
    solution: str | None,
    feedback: str | None,
    templates: RepromptTemplates = RepromptTemplates(),
) -> str:
    """The self-teacher's user message (§3.1 step 4): ``prompt + solution_section + feedback_section +
    suffix``.

    ``prompt_text`` is the last user message of the original chat. With neither a solution nor feedback the
    teacher sees the original prompt unchanged. Placeholders are read from the templates only, so braces in
    the prompt or the solution are safe.
    """
    if solution is None and feedback is None:
        return prompt_text
    solution_section = (
        templates.solution.format(successful_previous_attempt=solution) if solution is not None else ""
    )
    feedback_section = templates.feedback.format(feedback_raw=feedback) if feedback is not None else ""
    return templates.reprompt.format(prompt=prompt_text, solution=solution_section, feedback=feedback_section)


def self_teacher_contexts(
    group_rewards: Sequence[float],
    completions: Sequence[str],
    feedbacks: Sequence[str | None] | None,
    *,
    success_threshold: float = 1.0,
    dont_reprompt_on_self_success: bool = True,
    include_feedback: bool = True,
    feedback_only_without_solution: bool = True,
    remove_thinking: bool = True,
) -> list[TeacherContext | None]:
    """Teacher context for each rollout of ONE group (§3.1 steps 1–3, 6); ``None`` = no teacher (SD mask 0).

    Solution: the first rollout with ``reward ≥ success_threshold``, skipping the rollout itself when
    ``dont_reprompt_on_self_success``, its ``<think>`` blocks removed when ``remove_thinking``. Feedback: the
    rollout's own non-blank feedback string when ``include_feedback``, dropped when a solution exists and
    ``feedback_only_without_solution``. Pass ``build_reprompt(prompt, *ctx)`` to get the teacher's text. Note
    that a correct rollout with a correct sibling does get a teacher (SRPO's routing is what removes it,
    §5.1).
    """
    if len(group_rewards) != len(completions) or (
        feedbacks is not None and len(feedbacks) != len(completions)
    ):
        raise ValueError("group_rewards, completions and feedbacks must have one entry per rollout")
    successes = [j for j, r in enumerate(group_rewards) if r >= success_threshold]
    contexts: list[TeacherContext | None] = []
    for i in range(len(completions)):
        candidates = [j for j in successes if not (dont_reprompt_on_self_success and j == i)]
        solution = None
        if candidates:
            solution = completions[candidates[0]]
            solution = strip_thinking(solution) if remove_thinking else solution
        feedback = feedbacks[i] if include_feedback and feedbacks is not None else None
        if feedback is not None and (
            not feedback.strip() or (solution is not None and feedback_only_without_solution)
        ):
            feedback = None
        contexts.append(None if solution is None and feedback is None else TeacherContext(solution, feedback))
    return contexts


def sdpo_token_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    logp_old_BT: torch.Tensor,
    sampler_logp_BT: torch.Tensor | None,
    mask_BT: torch.Tensor,
    *,
    k: int = 100,
    alpha: float = 0.5,
    tail: bool = True,
    is_cap: float = 2.0,
    logp_BT: torch.Tensor | None = None,
    rollout_is_cap: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPO per-token distillation loss (§3.2); returns ``(loss_BT, teacher_entropy_BT)``, both 0 where
    masked.

    ``loss_t = JSD_alpha`` over the student's top-``k`` (+ tail) support (alpha = teacher weight: 0 forward
    KL,
    1 reverse KL), times two detached, capped importance weights from §3.2:

    * ``min(exp(clamp(logp − logp_old, ±20)), is_cap)``, SDPO's ``is_clip``. ``logp_BT`` is the current
    student's
      log-prob of the sampled token; ``None`` takes the on-policy shortcut ``logp := logp_old`` (ratio exactly
      1).
    * ``min(exp(logp_old − sampler_logp), rollout_is_cap)``, token-level rollout TIS for the sampler/learner
      mismatch (§0.3); skipped when ``sampler_logp_BT`` is ``None``.

    ``mask_BT`` should be response mask × self-distillation (or SRPO routing) mask; aggregate the result with
    ``losses.aggregate(loss_BT, mask_BT, "token-mean")``. Teacher logits come from a no-grad forward at the
    same temperature as the student's.
    """
    div_BT, teacher_entropy_BT = student_topk_divergence(
        student_logits_BTV, teacher_logits_BTV, k, alpha, tail
    )
    old = logp_old_BT.detach().float()
    if logp_BT is not None:
        log_ratio = (logp_BT.detach().float() - old).clamp(-20.0, 20.0)
        div_BT = div_BT * log_ratio.exp().clamp(max=is_cap)
    if sampler_logp_BT is not None:
        div_BT = div_BT * truncated_is_weights(old, sampler_logp_BT.detach().float(), rollout_is_cap)
    m = mask_BT.to(div_BT.dtype)
    return div_BT * m, teacher_entropy_BT * m


@torch.no_grad()
def ema_update(
    teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor], rate: float = 0.05
) -> None:
    """In place ``t ← (1 − rate)·t + rate·s`` for each teacher/student parameter pair (§3.3, default rate
    0.05).

    Call after the training step's optimizer step(s); pairs must line up (same order and shapes).
    """
    for t, s in zip(teacher_params, student_params, strict=True):
        if t.shape != s.shape:
            raise ValueError(
                f"EMA parameter shapes differ: teacher {tuple(t.shape)} vs student {tuple(s.shape)}"
            )
        t.lerp_(s.detach().to(device=t.device, dtype=t.dtype), rate)
