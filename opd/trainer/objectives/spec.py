"""``ObjectiveSpec``: the learner's view of the objective, built from a config by ``opd.plan`` and picklable
to a learner actor. It carries the objective sections as the config holds them (each objective reads its own
section, by its name, in its module) and the few values every objective shares; the properties below are the
one place that maps the shared sections onto what the learner, the losses and the router read. Imports without
torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opd.signal import TeacherSignal, teacher_signal
from opd.trainer.objectives import PG_SECTION, SELF_TEACHER_SECTION, TEACHER_SECTION, Objective, get


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str = "opd"
    # objective name -> its section; absent: defaults
    sections: Mapping[str, Any] = field(default_factory=dict)
    norm_len: int | None = None  # rollout.max_new_tokens (Dr.GRPO's constant length)
    kl_ref_coef: float = 0.0  # > 0: a KL penalty to the reference model on top of any objective
    kl_ref_kind: str = "low_var_kl"  # k1 | k2 | k3 | low_var_kl (opd.trainer.divergences.kl_penalty)
    select_mode: str | None = None  # TIP token selection (objectives with token_selection)
    keep_ratio: float = 1.0

    def __getitem__(self, section: str) -> Any:
        """An objective's config section as the run set it (its defaults where the spec was built without
        it)."""
        got = self.sections.get(section)
        if got is not None:
            return got
        cls = get(section).section
        if cls is None:
            raise KeyError(f"objective {section!r} has no config section")
        return cls()

    @property
    def objective(self) -> Objective:
        return get(self.name)

    @property
    def own(self) -> Any:
        """This objective's own section."""
        return self[self.name]

    @property
    def needs_self_teacher(self) -> bool:
        return self.objective.self_teacher

    @property
    def needs_reference(self) -> bool:
        return self.objective.reference or self.kl_ref_coef > 0

    @property
    def signal(self) -> TeacherSignal:
        """The teacher signal this objective reads (``opd.signal``: decided there, as for every other
        role)."""
        t = self[TEACHER_SECTION]
        return teacher_signal(self.objective, t.divergence, t.full_vocab_source, top_k=0)

    @property
    def needs_hf_teacher(self) -> bool:
        return self.signal.learner_runs_teacher

    @property
    def needs_teacher_head(self) -> bool:
        """The teacher's actor sends its hidden states; this learner holds only the teacher's LM head."""
        return self.signal.hidden

    # The policy-gradient settings every such objective shares
    # (``opd.trainer.objectives.loss.pg_token_loss``).
    @property
    def agg(self) -> str:
        return self[PG_SECTION].loss_agg if self.objective.sequence_agg else "token-mean"

    @property
    def ratio(self) -> str:
        return self[PG_SECTION].ratio

    @property
    def clip_low(self) -> float:
        return self[PG_SECTION].clip_low

    @property
    def clip_high(self) -> float:
        return self[PG_SECTION].clip_high

    @property
    def dual_clip(self) -> float | None:
        return self[PG_SECTION].dual_clip

    @property
    def tis_cap(self) -> float:
        return self[self.objective.tis_section].tis_cap

    # The self-teacher's (SDPO, SRPO).
    @property
    def self_teacher_settings(self) -> Any:
        return self[SELF_TEACHER_SECTION]

    @property
    def entropy_beta(self) -> float:
        """beta of an entropy-weighted objective's exp(-beta * H) weights (its own section's
        ``entropy_beta``)."""
        return self.own.entropy_beta

    def route_settings(self) -> dict:
        """The router's values from the shared sections (``opd.trainer.routing.RoutePlan``)."""
        pg, st = self[PG_SECTION], self[SELF_TEACHER_SECTION]
        return dict(norm_by_std=pg.norm_adv_by_std, adv_eps=pg.adv_eps,
                    success_threshold=st.success_threshold,
                    dont_reprompt_on_self_success=st.dont_reprompt_on_self_success,
                    max_reprompt_len=st.max_reprompt_len)
