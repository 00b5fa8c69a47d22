"""One typed config tree: YAML file + ``key=value`` overrides, validated at start-up.

Every error names the dotted key it is about, and all errors are collected before raising, so a user fixes a
config in one pass. Nothing on disk is touched here.

    cfg = load_config("configs/demo.yaml", ["algorithm=grpo", "trainer.lr=5e-4"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, create_model, field_validator, model_validator

from opd.config_sections import (  # noqa: F401  (re-exported: opd.config is where callers find them)
    AgentConfig,
    CheckpointConfig,
    ClusterConfig,
    EvalConfig,
    KLRefConfig,
    LoraConfig,
    ModelsConfig,
    RolloutConfig,
    RunConfig,
    SelectionConfig,
    TaskConfig,
    TeacherConfig,
    TrackingConfig,
    TrainerConfig,
    VerifiersConfig,
    WeightingConfig,
)
from opd.errors import ConfigError
from opd.section import Section as _Section
from opd.signal import TeacherSignal, teacher_signal
from opd.trainer.objectives import DEFAULT, REGISTRY, TEACHER_SECTION, Objective, get, names


class _Core(_Section):
    """The sections every job has; ``Config`` adds one per objective (``opd.trainer.objectives``), under its
    name."""

    run: RunConfig = RunConfig()
    cluster: ClusterConfig = ClusterConfig()
    models: ModelsConfig = ModelsConfig()
    task: TaskConfig = TaskConfig()
    algorithm: str = DEFAULT  # a module of opd.trainer.objectives
    kl_ref: KLRefConfig = KLRefConfig()
    selection: SelectionConfig = SelectionConfig()
    weighting: WeightingConfig = WeightingConfig()
    rollout: RolloutConfig = RolloutConfig()
    teacher: TeacherConfig = TeacherConfig()
    verifiers: VerifiersConfig = VerifiersConfig()
    trainer: TrainerConfig = TrainerConfig()
    lora: LoraConfig = LoraConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    agent: AgentConfig = AgentConfig()

    @field_validator("algorithm")
    @classmethod
    def _known_objective(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(f"unknown objective {v!r}; valid: {', '.join(REGISTRY)}")
        return v

    @property
    def objective(self) -> Objective:
        return get(self.algorithm)

    @model_validator(mode="after")
    def _cross_checks(self) -> _Core:
        objective = self.objective
        for key, n in (("rollout.max_new_tokens", self.rollout.max_new_tokens),
                       ("eval.max_new_tokens", self.eval.max_new_tokens)):
            if n >= self.rollout.max_model_len:
                raise ValueError(f"{key}={n} leaves no room for a prompt in "
                                 f"rollout.max_model_len={self.rollout.max_model_len}")
        if self.teacher.top_k > self.teacher.max_logprobs:
            self.teacher.max_logprobs = self.teacher.top_k
        if "default" in self.models.teachers:
            raise ValueError("models.teachers: 'default' names models.teacher; choose another name")
        signal = self.teacher_signal
        divergence = f"{TEACHER_SECTION}.divergence"
        if (objective.teacher == "divergence"
                and self.teacher_settings.divergence not in objective.divergences):
            raise ValueError(f"algorithm={self.algorithm} reads "
                             f"{divergence}={' or '.join(objective.divergences)} only "
                             f"(got {self.teacher_settings.divergence}): "
                             f"set {divergence}={objective.divergences[0]}")
        if self.models.teachers and signal.kind == "full_vocab":
            raise ValueError(f"models.teachers: {divergence}=full_vocab runs one teacher in the learner; "
                             "use one teacher")
        if self.task.name == "files" and not (self.task.train_path and self.task.test_path):
            raise ValueError("task.name=files needs task.train_path and task.test_path")
        if self.task.name == "hub" and not self.task.dataset:
            raise ValueError("task.name=hub needs task.dataset (ORG/NAME[@REVISION] or a local directory)")
        if self.task.name not in ("files", "hub") and self.eval.num_prompts > self.task.num_test:
            raise ValueError(f"eval.num_prompts={self.eval.num_prompts} exceeds "
                             f"task.num_test={self.task.num_test}")
        if self.selection.mode and not objective.token_selection:
            raise ValueError(f"selection.mode={self.selection.mode!r} applies to algorithm "
                             f"{names('token_selection')}, not {self.algorithm!r}")
        if self.selection.mode and signal.kind != "sampled":
            raise ValueError(f"selection.mode needs {divergence}=sampled "
                             "(it ranks tokens by the sampled-token divergence)")
        if signal.kind == "topk" and self.teacher.top_k == 0:
            raise ValueError(f"{divergence}={self.teacher_settings.divergence} needs teacher.top_k > 0")
        if self.rollout.group_size < objective.min_group:
            raise ValueError(f"algorithm={self.algorithm} needs rollout.group_size >= {objective.min_group} "
                             f"({objective.min_group_reason})")
        if (self.kl_ref.coef and objective.reference and self.kl_ref.reference
                and self.kl_ref.reference != self._own_reference):
            raise ValueError("kl_ref.reference: the learner holds one reference model, and "
                             f"{self.algorithm}.reference names another")
        if self.rollout.dynamic_sampling and not objective.group_advantages:
            raise ValueError(f"rollout.dynamic_sampling keeps groups whose rewards differ, which only a "
                             f"group-relative advantage learns from; algorithm={self.algorithm} has none "
                             f"(use {names('group_advantages')})")
        if (self.trainer.num_ranks > 1 and self.trainer.placement_strategy == "STRICT_SPREAD"
                and not self.cluster.address):
            raise ValueError("trainer.placement_strategy=STRICT_SPREAD puts each learner rank on its own "
                             "node; an embedded local Ray has one node (set cluster.address, or use PACK / "
                             "SPREAD)")
        source = f"{TEACHER_SECTION}.full_vocab_source"
        if self.teacher.protocol == "openai" and not (self.teacher.url and self.teacher.model):
            raise ValueError("teacher.protocol=openai needs teacher.url (the server) and teacher.model (its "
                             "name)")
        if self.teacher.protocol == "openai" and signal.kind == "full_vocab":
            raise ValueError(f"teacher.protocol=openai: a completions server returns log-probs and top-k "
                             f"rows, not the full vocabulary ({divergence}=full_vocab); use sampled or "
                             "teacher_topk")
        if signal.hidden and self.teacher.url:
            raise ValueError(f"{source}=teacher: a teacher server (teacher.url) returns log-probs, not "
                             f"hidden states; run the teacher locally or use {source}=learner")
        if signal.hidden and self.teacher.engine == "vllm":
            raise ValueError(f"{source}=teacher needs the teacher's hidden states, which the vLLM engine "
                             "does not return: set teacher.engine=hf (or auto)")
        if self.lora.r > 0 and self.rollout.engine != "vllm":
            raise ValueError(f"lora.r={self.lora.r}: LoRA adapters are served by the vLLM engine only; "
                             "set rollout.engine=vllm or lora.r=0 "
                             f"(got rollout.engine={self.rollout.engine!r})")
        if self.lora.r > 512:
            raise ValueError(f"lora.r={self.lora.r} exceeds vLLM's largest max_lora_rank (512)")
        if self.lora.r > 0 and not self.lora.target_modules:
            raise ValueError("lora.target_modules is empty: name the modules that get an adapter "
                             "(e.g. q_proj, v_proj)")
        if self.cluster.colocate and (self.rollout.num_workers != 1 or self.trainer.num_ranks != 1):
            raise ValueError("cluster.colocate=true runs the one rollout engine inside the one learner; "
                             f"set rollout.num_workers=1 (got {self.rollout.num_workers}) and "
                             f"trainer.num_ranks=1 (got {self.trainer.num_ranks}), or cluster.colocate=false")
        if self.teacher.tokenizer == "cross" and (found := self.cross_tokenizer_problems()):
            raise ValueError("teacher.tokenizer=cross: " + "; ".join(found))
        return self

    def cross_tokenizer_problems(self) -> list[str]:
        """What a teacher with another tokenizer cannot do in this job (``teacher.tokenizer=cross``, or
        ``auto`` when the pre-flight finds the vocabularies differ): it gives a log-prob per chunk of bytes
        and its top-k at a chunk's start, so not the full vocabulary; one teacher, single-turn samples, whole
        sequences."""
        signal, divergence = self.teacher_signal, f"{TEACHER_SECTION}.divergence"
        found = []
        if signal.kind == "full_vocab":
            found.append(f"{divergence}=full_vocab reads the teacher's distribution over the student's "
                         "vocabulary, which another tokenizer does not have; use sampled or teacher_topk")
        if self.models.teachers:
            found.append("models.teachers: one teacher only")
        if self.agent.environment is not None:
            found.append("agent.environment: multi-turn episodes are scored on the student's ids only")
        if self.selection.mode:
            found.append("selection.mode: a chunk's tokens are credited together, so none is left out")
        if self.teacher.url:
            found.append("teacher.url: a served teacher is checked against the student's ids; run it locally")
        return found

    def section(self, name: str) -> _Section:
        """An objective's section (``Config`` has one per registered objective, as an attribute of its
        name)."""
        return getattr(self, name)

    def with_keys(self, values: dict[str, Any]):
        """This config with each dotted key of ``values`` set to its value, validated again."""
        if not values:
            return self
        tree = self.model_dump(mode="json")
        for key, value in values.items():
            *parents, last = key.split(".")
            node = tree
            for part in parents:
                node = node[part]
            node[last] = value
        return build_config(tree)

    @property
    def teacher_settings(self):
        """The section whose divergence and full-vocabulary settings every objective that reads a teacher
        follows."""
        return self.section(TEACHER_SECTION)

    @property
    def teacher_signal(self) -> TeacherSignal:
        """What the teacher gives each step and who computes it (``opd.signal``: the one place that
        decides)."""
        t = self.teacher_settings
        return teacher_signal(self.objective, t.divergence, t.full_vocab_source, self.teacher.top_k)

    @property
    def needs_teacher(self) -> bool:
        """Whether teacher actors start: whenever the objective reads a teacher (also when the learner
        computes the training signal itself, as the teacher actor answers the held-out evaluation), and for
        any objective with ``eval.teacher``."""
        return self.teacher_signal.kind != "none" or self.eval.teacher

    @property
    def _own_reference(self) -> str | None:
        return self.section(self.algorithm).reference if self.objective.reference else None

    @property
    def reference_key(self) -> str:
        """The dotted key naming the reference model the learner holds: the objective's own, else kl_ref's."""
        return f"{self.algorithm}.reference" if self.objective.reference else "kl_ref.reference"

    @property
    def reference_dir(self) -> str | None:
        """The reference model the learner holds (the objective's, the kl_ref penalty's); None: the student's
        start."""
        return self._own_reference if self.objective.reference else self.kl_ref.reference

    @property
    def teacher_engine(self) -> str:
        """The engine of local teacher actors (``teacher.engine``, ``auto`` resolved)."""
        if self.teacher.engine != "auto":
            return self.teacher.engine
        return "hf" if self.teacher_signal.hidden else self.rollout.engine


# One section per registered objective, under its name (``Objective.section``), after the core ones.
Config = create_model(
    "Config", __base__=_Core, __module__=__name__,
    **{name: (o.section, o.section()) for name, o in REGISTRY.items() if o.section is not None},
)


def _set_dotted(tree: dict, key: str, value: object) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML ({e})") from e
        parsed.append((key, value))
    return parsed


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown config key")
        elif e["type"] == "value_error":  # our validators' messages name the keys and the value themselves
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {msg}" if key == "<root>" or msg.startswith(f"{key}.") else f"  {key}: {msg}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal keys without a word, so a second ``trainer:`` section would silently
    replace the first; this loader refuses it, naming the key and both lines."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"config file {key_node.start_mark.name!r}: key {key!r} appears twice "
                                  f"(lines {seen[key]} and {line}); merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            with p.open() as f:
                tree = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if tree is None:  # a wrong path to an empty file, or one an editor truncated: never "all defaults"
            raise ConfigError(f"config file {str(p)!r} is empty (or only comments); give the sections to "
                              "run, e.g. copy configs/demo.yaml")
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return build_config(tree)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
