"""One typed config tree: YAML file + ``key=value`` overrides, validated at start-up.

Every error names the dotted key it is about, and all errors are collected before raising, so a user fixes a
config in one pass. Nothing on disk is touched here.

    cfg = load_config("configs/demo.yaml", ["algorithm=grpo", "trainer.lr=5e-4"])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from opd.errors import ConfigError
from opd.rewards.spec import VerifierSpec, spec_problems
from opd.section import Section as _Section
from opd.signal import TeacherSignal, teacher_signal
from opd.trainer.objectives import DEFAULT, REGISTRY, TEACHER_SECTION, Objective, get, names


class RunConfig(_Section):
    name: str = "run"
    output_dir: str = Field("runs/run", min_length=1)  # metrics, TensorBoard events, checkpoints, summary
    seed: int = 0
    log_samples: bool = False  # one JSON line per trained sample in RUN_DIR/samples.jsonl (a rollout dump)
    # off a terminal: one line per step, or at most one per this many seconds
    log_every_s: float = Field(0.0, ge=0)


class ClusterConfig(_Section):
    address: str | None = None  # None: start an embedded local Ray; "auto" or "ray://HOST:10001" to join one
    num_cpus: int | None = None  # logical CPUs for an embedded Ray; None lets Ray count them
    include_dashboard: bool = False
    # actors not started by then (no resources, stuck load) fail the job
    start_timeout_s: float = Field(600.0, gt=0)
    # the rollout engine inside the learner's process (rank 0), new weights copied in place each step
    colocate: bool = False


class ModelsConfig(_Section):
    student: str = "models/demo/student"  # any HF causal-LM directory vLLM can serve
    teacher: str = "models/demo/teacher"  # the default teacher
    teachers: dict[str, str] = {}  # more teachers by name; a row picks one with teacher.column
    dtype: Literal["float32", "bfloat16"] = "float32"
    # the chat template prompts are rendered with, for a student (and teacher) whose tokenizer has none (a
    # base model): a .jinja file or the Jinja text itself; None: the tokenizer's own
    chat_template: str | None = None


class TaskConfig(_Section):
    # arithmetic: a+b= for the tiny demo models; tool_chains: a*b+c= with the calc tool (configs/tools.yaml);
    # word_problems: short word problems for real instruct models (math_answer); files: the user's rows from
    # train_path / test_path; hub: a `datasets` dataset
    name: Literal["arithmetic", "tool_chains", "word_problems", "files", "hub"] = "arithmetic"
    train_path: str | None = None  # files: .jsonl/.json/.parquet/.csv or a datasets save_to_disk directory
    test_path: str | None = None  # files: held-out rows, same format
    # hub: a dataset id (ORG/NAME[@REVISION]) or a local directory laid out like a hub dataset repo
    dataset: str | None = None
    dataset_config: str | None = None  # hub: the dataset's config (subset), e.g. gsm8k's `main`
    train_split: str = "train"  # hub: the split trained on
    test_split: str = "test"  # hub: the held-out split
    prompt_column: str = "prompt"  # files, hub: the column rendered as the user turn of the chat template
    answer_column: str = "answer"  # files, hub: the ground truth handed to verifiers as `answer`
    # files, hub: a regex finding the answer in the answer column (its first group, else the match): GSM8K's
    # '####\s*(.+)$'; the column's full text goes to verifiers as `answer_text`
    answer_pattern: str | None = None
    # prompts that leave no room for max_new_tokens: refuse, or drop and count
    too_long: Literal["fail", "skip"] = "fail"
    num_train: int = Field(20000, gt=0)
    num_test: int = Field(500, gt=0)
    max_digits_a: int = Field(3, ge=1, le=9)
    max_digits_b: int = Field(3, ge=1, le=9)
    ops: list[Literal["+", "-"]] = ["+"]
    max_operand: int = Field(20, ge=2)  # word_problems: numbers in the problems are 2..max_operand
    # word_problems
    kinds: list[Literal["more", "buy", "take", "lose", "sum"]] = ["more", "buy", "take", "lose", "sum"]
    seed: int = 0

    @field_validator("answer_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a regular expression ({e})") from None
        return v


class KLRefConfig(_Section):
    """A KL penalty to a frozen reference model, added to any objective's per-token loss (verl's
    use_kl_loss)."""

    coef: float = Field(0.0, ge=0)  # 0: off
    kind: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    reference: str | None = None  # reference model dir; None: the student's initial weights


class SelectionConfig(_Section):
    mode: Literal["entropy", "divergence", "soft_or", "overconfident", "entropy_sample"] | None = None
    keep_ratio: float = Field(0.5, gt=0, le=1)


class WeightingConfig(_Section):
    paced: bool = False  # weight each problem by p^a (1-p)^b of its group pass rate
    paced_a: float = Field(1.0, ge=0)
    paced_b: float = Field(1.0, ge=0)
    quality_gate: float | None = None  # train only on samples whose reward >= this (KEPO-style gate)
    drop_uniform_groups: bool = False  # drop groups whose rewards are all equal (no GRPO signal)


class RolloutConfig(_Section):
    num_workers: int = Field(1, ge=1)
    # Ray CPUs per rollout worker: its engine runs this many threads (Ray sets OMP_NUM_THREADS). Synchronous
    # runs on few cores give each stage every core, since the stages take turns; asynchronous ones split the
    # cores instead
    num_cpus: int = Field(1, ge=1)
    prompts_per_step: int = Field(32, ge=1)
    group_size: int = Field(4, ge=1)  # G samples per prompt
    max_new_tokens: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_model_len: int = Field(128, ge=8)
    kv_cache_gib: float = Field(1.0, gt=0)
    probe_tolerance: float = Field(1e-3, gt=0)  # max |logprob diff| between learner and engine after a sync
    # 0: synchronous; k: generation runs up to k steps ahead of the learner
    max_staleness: int = Field(0, ge=0)
    # DAPO's dynamic sampling: keep only groups whose rewards differ, drawing more prompts (up to
    # max_resample_rounds extra batches) until prompts_per_step such groups fill the step
    dynamic_sampling: bool = False
    max_resample_rounds: int = Field(4, ge=1)
    # prompts per generation call, each scored as it finishes; 0: one call per worker
    chunk_prompts: int = Field(0, ge=0)
    max_restarts: int = Field(3, ge=0)  # dead rollout workers replaced per run before the job fails
    # hf: transformers generate (CPU runs, tests); vllm is the production path
    engine: Literal["vllm", "hf"] = "vllm"


class TeacherConfig(_Section):
    top_k: int = Field(0, ge=0)  # 0: only the sampled token's logprob (all OPD needs)
    max_logprobs: int = Field(20, ge=1)  # vLLM rejects top_k above this; raised automatically to top_k
    # a running teacher server (http://HOST:PORT); None: a local vLLM teacher actor
    url: str | None = None
    # how teacher.url speaks: opd (`opd serve-teacher`'s /v1/score) or openai (an OpenAI-compatible
    # completions server with prompt log-probs, `vllm serve`: sampled and top-k signals, not the full
    # vocabulary)
    protocol: Literal["opd", "openai"] = "opd"
    model: str | None = None  # the served model's name (openai: required; opd: checked against the server's)
    # name of the env var holding the server's bearer token / API key (read by the driver, never the key
    # itself)
    token_env: str | None = None
    timeout_s: float = Field(120.0, gt=0)  # per HTTP request to teacher.url; failures retry with back-off
    # teacher.url unreachable this long (retrying with back-off): fail the job
    retry_deadline_s: float = Field(300.0, gt=0)
    # dataset column naming each row's teacher (a models.teachers key); empty: default
    column: str | None = None
    num_cpus: int = Field(1, ge=1)  # Ray CPUs (engine threads) per local teacher actor, as rollout.num_cpus
    # local teacher actors' engine. auto: transformers (hf) when opd.full_vocab_source=teacher (hidden
    # states), else rollout.engine. hf scores only the response positions with the LM head; vllm's
    # prompt_logprobs scores all
    engine: Literal["auto", "vllm", "hf"] = "auto"
    # same: the teacher scores the student's own ids (its vocabulary must be the student's); cross: another
    # tokenizer, scored on its own tokens of the same bytes and aligned by bytes (opd.teacher.cross); auto:
    # same when the vocabularies are identical, else cross (decided by the pre-flight)
    tokenizer: Literal["auto", "same", "cross"] = "auto"

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {v!r})")
        return v


class VerifiersConfig(_Section):
    functions: list[VerifierSpec] = Field([VerifierSpec(name="exact_answer")], min_length=1)
    timeout_s: float = Field(10.0, gt=0)
    chunk_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=1)  # long-lived verifier host processes

    @field_validator("functions", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        # "name" = {name: ...}
        return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _usable(self) -> VerifiersConfig:
        if problems := spec_problems(self.functions):
            raise ValueError("; ".join(problems))
        return self


class TrainerConfig(_Section):
    total_steps: int = Field(40, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # sequences per forward/backward; gradients accumulate over a step
    micro_batch_size: int = Field(64, ge=1)
    # >0: micro-batches by padded-token budget (length-sorted), not by count
    micro_batch_tokens: int = Field(0, ge=0)
    # LM head and loss in pieces of at most this many response positions (whole sequences), so [tokens, vocab]
    # logits never exist for a whole micro-batch; 0: all at once. The update is the same either way.
    logits_chunk_tokens: int = Field(1024, ge=0)
    # run each distinct prompt of a micro-batch once, its samples' responses reading its key/value cache (a
    # group's G samples share their prompt); the same update. Off under gradient_checkpointing (HF drops the
    # cache there)
    share_prompts: bool = True
    # bf16: forward under bf16 autocast; float32 weights and loss maths
    autocast: Literal["off", "bf16"] = "off"
    # recompute the student's layer activations in backward (less memory)
    gradient_checkpointing: bool = False
    # where each learner rank runs: auto takes one GPU per rank when the cluster has them (and a learner
    # driven directly, the GPU its process sees), else the CPU; cuda without a GPU is refused at start-up
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each of Adam's betas must be in [0, 1) (got {list(v)})")
        return v

    @field_validator("autocast", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false
    torch_threads: int = Field(1, ge=1)
    # learner ranks (torch.distributed); >1 splits each batch into token-balanced shards
    num_ranks: int = Field(1, ge=1)
    # Ray placement group of the ranks
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl where the rank sees a GPU, else gloo
    # How several ranks hold the student: fsdp2 shards weights, gradients and AdamW state per decoder layer
    # (and the reference / self-teacher alike); ddp keeps a whole replica on each rank and all-reduces the
    # gradients.
    strategy: Literal["fsdp2", "ddp"] = "fsdp2"


class LoraConfig(_Section):
    # 0: train all weights; >0: a PEFT LoRA adapter of this rank, synced to vLLM unmerged
    r: int = Field(0, ge=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrackingConfig(_Section):
    wandb: bool = False  # log every step's metrics to Weights & Biases
    wandb_project: str = "opd"
    # offline: files under RUN_DIR/wandb, `wandb sync` later
    wandb_mode: Literal["offline", "online"] = "offline"
    mlflow: bool = False  # log every step's metrics to MLflow
    mlflow_tracking_uri: str | None = None  # None: a file store under RUN_DIR/mlruns
    mlflow_experiment: str = "opd"


class EvalConfig(_Section):
    every: int = Field(0, ge=0)  # 0: only before and after training
    num_prompts: int = Field(500, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    # held-out teacher KL: per held-out prompt this many samples of the student (temperature 1,
    # rollout.max_new_tokens), scored by the teacher; their mean log q - log pi_T per token estimates
    # KL(student || teacher). 0: not measured
    kl_samples: int = Field(1, ge=0)


class CheckpointConfig(_Section):
    every: int = Field(10, ge=0)  # 0: only at the end
    keep: int = Field(2, ge=1)


class AgentConfig(_Section):
    """Multi-turn episodes with tools (``opd.agents``; docs/episodes.md). A turn is at most
    ``rollout.max_new_tokens`` tokens; an episode's ids at most ``rollout.max_model_len``."""

    # None: one prompt -> one completion; "tools": the built-in tool environment over ``tools``; else an
    # Environment class or factory as 'package.module:Name' / 'path/to/file.py:Name'
    environment: str | None = None
    tools: list[str] = ["calc"]  # built-ins (calc, python) or plain functions by path
    env_kwargs: dict[str, Any] = {}  # keyword arguments of a user environment's factory
    max_turns: int = Field(4, ge=1)
    max_episode_tokens: int = Field(256, ge=1)  # response tokens of all kinds: sampled, environment, template
    max_observation_tokens: int = Field(64, ge=1)  # each observation cut to this many tokens
    episode_timeout_s: float = Field(60.0, gt=0)
    max_tool_errors: int = Field(3, ge=1)  # errors in a row that end an episode (parse_error)
    max_tool_timeouts: int = Field(2, ge=1)  # timed-out calls that end an episode (tool_timeout)


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
        computes the training signal itself, as the teacher actor answers the held-out evaluation)."""
        return self.teacher_signal.kind != "none"

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
