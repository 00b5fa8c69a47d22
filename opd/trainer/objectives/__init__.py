"""Objectives as modules behind one protocol. Each module here is one objective and declares, on its class,
everything the rest of opd asks of it: its config section (a ``Section`` under the key of its name), the
teacher signal it reads and the ``opd.divergence`` values it allows, whether it needs a reference model, a
group of samples, a self-teacher or the verifiers' rewards, how the router treats its samples, and its
per-token loss. Config, pre-flight, submission, plan, signal, router and learner read these declarations; none
of them names an objective. Adding one is a module here (found and registered on import), its test, and its
commented keys in
``configs/demo.yaml``: ``docs/objectives.md`` walks through it.

This package and its declarations import without torch (``opd.config`` validates against them); the losses
import torch inside ``token_loss``. Every ``token_loss`` returns ``(loss_BT, count_BT)``: the per-token loss
already multiplied by its weights, and the tokens that belong in the denominator, both zero outside
``mask_BT``. The learner sums ``loss_BT`` over micro-batches and divides by the batch-wide ``count_BT`` total
(§0.2).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    import torch

    from opd.section import Section
    from opd.trainer.objectives.loss import Aux
    from opd.trainer.objectives.spec import ObjectiveSpec

# Sections that several objectives read, each owned by one objective's module: the teacher divergence settings
# (``divergence``, ``full_vocab_source``, ...), the policy-gradient settings (ratio, clipping, group
# advantages, sequence aggregation) and the self-teacher's.
TEACHER_SECTION, PG_SECTION, SELF_TEACHER_SECTION = "opd", "grpo", "sdpo"
DEFAULT = "opd"  # the objective of a config that names none (``algorithm``)
SELF_TEACHER_ROUTE = "sdpo"  # the route of a sample that learns from the self-teacher (``Objective.routes``)


class Objective:
    name: ClassVar[str]
    section: ClassVar[type[Section] | None] = None  # its config section, at the key ``name``
    # The teacher signal its loss reads: none; the sampled token's log-prob whatever opd.divergence says; or
    # what opd.divergence says, which must then be one of ``divergences``.
    teacher: ClassVar[Literal["none", "sampled", "divergence"]] = "none"
    divergences: ClassVar[tuple[str, ...]] = ()
    # the router computes GRPO's group-relative advantages from rewards
    group_advantages: ClassVar[bool] = False
    self_teacher: ClassVar[bool] = False  # siblings' answers as context: router prompts, an EMA self-teacher
    # a frozen reference model (its section's ``reference``, default the student)
    reference: ClassVar[bool] = False
    min_group: ClassVar[int] = 1  # rollout.group_size it needs
    sequence_agg: ClassVar[bool] = False  # grpo.loss_agg's sequence-level modes apply
    token_selection: ClassVar[bool] = False  # TIP (selection.mode) ranks its sampled-token divergence
    entropy_weighted: ClassVar[bool] = False  # SRPO: the self-teacher's exp(-beta*H) weights its SDPO tokens
    # only samples routed to it count in the denominator (SDPO §10.4)
    routed_denominator: ClassVar[bool] = False
    # the config section whose tis_cap caps its sampler->learner weight
    tis_section: ClassVar[str] = PG_SECTION

    @property
    def uses_rewards(self) -> bool:
        """Whether its loss reads the verifiers' rewards (else they only measure accuracy)."""
        return self.group_advantages or self.self_teacher

    @property
    def min_group_reason(self) -> str:
        return ("siblings are the self-teacher's solutions" if self.self_teacher
                else "a group of one has zero relative advantage")

    def routes(self, has_teacher: list[bool], correct: list[bool]) -> list[str] | None:
        """Per sample, which loss learns from it (self-teacher objectives); None: this objective's, for
        all."""
        return None

    def token_loss(self, spec: ObjectiveSpec, logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                   mask_BT: torch.Tensor, sampler_BT: torch.Tensor, adv_BT: torch.Tensor,
                   aux: Aux) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


REGISTRY: dict[str, Objective] = {}


def register(obj: Objective) -> Objective:
    if obj.name in REGISTRY:
        raise ValueError(f"objective {obj.name!r} is registered twice")
    REGISTRY[obj.name] = obj
    return obj


def get(name: str) -> Objective:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(REGISTRY)}") from None


def names(where: str) -> str:
    """The objectives whose declaration ``where`` is true, for messages (``names("token_selection")``)."""
    return ", ".join(n for n, o in REGISTRY.items() if getattr(o, where))


_SUPPORT = {"loss", "spec"}  # modules of this package that are not objectives

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_module.name}")
