"""The sections of a job's config (``opd.config.Config``): each a typed record with its defaults and its own
checks. Checks that span sections live on ``Config`` itself."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from opd.rewards.spec import VerifierSpec, spec_problems
from opd.section import Section as _Section


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
    # start the teacher for an objective that reads none (grpo, sdpo, srpo) as well, so its held-out
    # evaluation reports the teacher's accuracy and KL(student || teacher) as a teacher-scored objective's
    # does; the teacher still scores no training sample
    teacher: bool = False


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
