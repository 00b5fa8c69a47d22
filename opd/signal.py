"""What the teacher contributes to a training step, and which process computes it: one decision, made once.

``teacher_signal`` is the only place that reads the objective's declaration and the divergence to decide it;
the config (``Config.teacher_signal``), the driver's chunk scorer (what to ask the teacher actor for), the
router (what to hand the learner) and the learner (which teacher models to load) all read the resulting
``TeacherSignal``. Nobody asks the teacher for what another role then throws away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from opd.trainer.objectives import Objective

Kind = Literal["none", "sampled", "topk", "full_vocab"]
Source = Literal["none", "teacher", "learner"]

# uld reads the teacher's top-k probabilities only, not their ids
_BY_DIVERGENCE: dict[str, Kind] = {"sampled": "sampled", "teacher_topk": "topk", "uld": "topk",
                                   "full_vocab": "full_vocab"}


@dataclass(frozen=True)
class TeacherSignal:
    kind: Kind = "none"  # none | sampled (log-prob of each drawn token) | topk (+ top-k rows) | full_vocab
    # teacher: the teacher actor (or server) scores each chunk; learner: the learner runs the teacher's
    # forward itself
    source: Source = "none"
    top_k: int = 0  # top-k rows per token asked of the teacher (topk only)
    # full_vocab from the teacher actor: it sends final hidden states, the learner applies the head
    hidden: bool = False

    @property
    def scored_by_actor(self) -> bool:
        """Whether the teacher actor scores the training samples (else it only answers held-out
        evaluation)."""
        return self.source == "teacher"

    @property
    def learner_runs_teacher(self) -> bool:
        return self.source == "learner"


def teacher_signal(objective: Objective, divergence: str, full_vocab_source: str,
                   top_k: int) -> TeacherSignal:
    """The signal ``objective`` reads, from what it declares (``Objective.teacher``) and the teacher
    settings."""
    if objective.teacher == "none":
        return TeacherSignal()
    kind = "sampled" if objective.teacher == "sampled" else _BY_DIVERGENCE[divergence]
    if kind == "full_vocab":
        source: Source = "learner" if full_vocab_source == "learner" else "teacher"
        return TeacherSignal(kind, source, hidden=source == "teacher")
    return TeacherSignal(kind, "teacher", top_k=top_k if kind == "topk" else 0)
