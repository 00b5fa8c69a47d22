"""The job: sample -> verify and score -> route -> learn -> sync -> log/save, one step at a time.

    opd run configs/demo.yaml algorithm=grpo

``prepare`` does every check that can fail on bad input before anything is written; ``train`` is the loop.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray

from opd.agents import episode_setup
from opd.agents.metrics import episode_figures
from opd.checkpoint import RunState, load_state, save_checkpoint
from opd.cluster import Roles, init_ray, start_roles, stop_roles
from opd.config import Config, dump_config
from opd.data import PromptSource
from opd.models.hub import resolve_models
from opd.monitor.sinks import MetricsLogger, truncate_jsonl
from opd.plan import route_plan
from opd.preflight import check_inputs, check_job
from opd.rollout.stream import RolloutStream, Scored, load_in_flight
from opd.steps import (
    ChunkScorer,
    evaluation,
    held_out,
    step_metrics,
    sync_weights,
    warm_up_verifiers,
)
from opd.trainer.routing import route
from opd.types import Prompt, TrainBatch

logger = logging.getLogger(__name__)


@dataclass
class Job:
    run_dir: Path
    train: list[Prompt]
    test: list[Prompt]
    probe_ids: list[int]
    checkpoint: Path | None
    render: Callable[[str], list[int]]  # text -> student chat-template prompt ids (SDPO self-teacher prompts)


def prepare(cfg: Config, *, resume: bool = False, fresh: bool = False, change_objective: bool = False) -> Job:
    """Validate models, tokenizers, data, verifiers and the run directory; raise ConfigError before writing
    anything (``opd.preflight``). Then ``fresh`` clears a run already in ``run.output_dir``."""
    ckpt = check_job(cfg, resume=resume, fresh=fresh, change_objective=change_objective)
    tok, train, test = check_inputs(cfg)
    run_dir = Path(cfg.run.output_dir)
    if fresh and (run_dir / "metrics.jsonl").exists():
        shutil.rmtree(run_dir)
    probe = (test[0].token_ids + tok(test[0].answer, add_special_tokens=False)["input_ids"]
             + [tok.eos_token_id])
    return Job(run_dir, train, test, probe, ckpt, _renderer(tok))


def run(cfg: Config, *, resume: bool = False, fresh: bool = False, progress: bool = True,
        change_objective: bool = False) -> dict:
    cfg, _ = resolve_models(cfg)  # hub ids to local snapshots, once: every role loads these
    job = prepare(cfg, resume=resume, fresh=fresh, change_objective=change_objective)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "config.yaml").write_text(dump_config(cfg))
    init_ray(cfg)
    roles = None
    try:
        roles = start_roles(cfg)
        return train(cfg, job, roles, progress)
    finally:
        stop_roles(roles)


def _restore(job: Job, roles: Roles) -> RunState:
    if job.checkpoint is None:
        return RunState()
    ray.get(roles.learner.load.remote(str(job.checkpoint)))
    return load_state(job.checkpoint)


def _save(cfg: Config, job: Job, roles: Roles, st: RunState, stream: RolloutStream) -> None:
    def write(path: str) -> None:
        ray.get(roles.learner.save.remote(path))
        # checks the last sync's probe: a checkpoint only ever follows a checked sync
        stream.save_in_flight(path)

    save_checkpoint(job.run_dir, st, write, cfg.checkpoint.keep)


def _renderer(tok):  # the student's tokenizer, its chat template as the job's (preflight.student_tokenizer)
    def render(text: str) -> list[int]:
        msgs = [{"role": "user", "content": text}]
        return tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]

    return render


class SampleLog:
    """``RUN_DIR/samples.jsonl``: one line per sample of every trained step (``run.log_samples``), for audits
    of what was trained: every step's ids, each exactly once across a resume (lines of steps after the
    checkpoint are dropped when the run resumes, as metrics.jsonl's are)."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.path = run_dir / "samples.jsonl" if enabled else None
        if self.path is not None:
            truncate_jsonl(self.path, start_step)

    def log(self, step: int, taken: Scored, batch: TrainBatch | None) -> None:
        if self.path is None:
            return
        rollouts, rewards = taken.batch, taken.rewards
        routed = set(batch.uids) if batch else set()
        rows = [
            {"step": step, "uid": s.uid, "prompt_id": s.prompt.prompt_id, "weight_version": s.weight_version,
             "reward": rewards.rewards[i], "correct": rewards.correct[i],
             "failure": rewards.failures.get(s.uid),
             "trained": s.uid in routed, "finish_reason": s.finish_reason, "response": s.response_text,
             **(_episode_row(s) if s.episode else {})}
            for i, s in enumerate(rollouts.samples)
        ]
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


def _episode_row(s) -> dict:
    """An episode's ledger in samples.jsonl: each segment's origin and exact ids, and how it ended."""
    e = s.episode
    return {"prompt_ids": s.prompt.token_ids, "digest": e.digest, "stop": e.stop, "turns": e.turns,
            "tool_calls": e.tool_calls, "segments": [{"origin": o, "ids": s.response_ids[a:b]}
                                                     for o, a, b in e.spans]}


def train(cfg: Config, job: Job, roles: Roles, progress: bool = True) -> dict:
    wall0 = time.perf_counter()
    st = _restore(job, roles)
    # First, so a tracker that cannot start fails the job before minutes of evaluation.
    log = MetricsLogger(job.run_dir, cfg.trainer.total_steps, st.step, progress, job=cfg.run.name,
                        shared_ray=cfg.cluster.address is not None, tracking=cfg.tracking,
                        config=cfg.model_dump(mode="json"), run_name=cfg.run.name,
                        log_every_s=cfg.run.log_every_s)
    stream = RolloutStream(roles.rollout, PromptSource(job.train, cfg.run.seed, st.cursor), cfg.rollout,
                           cfg.run.seed, load_in_flight(job.checkpoint), scorer=ChunkScorer(roles, cfg),
                           episodes=episode_setup(cfg))
    # Every sync's probe is checked by the rollout pool before anything generated at those weights is handed
    # out, evaluated or stored with a checkpoint (RolloutPool.checked): the loop never waits for it by hand.
    st.version = sync_weights(roles, job.probe_ids, cfg.rollout.probe_tolerance)
    warm_up_verifiers(roles, job.test[0])
    if st.accuracy_before is None:
        before = held_out(roles, job.test, cfg)
        st.accuracy_before, st.teacher_kl_before = before["eval_accuracy"], before.get("eval_teacher_kl")
        st.episodes_before = episode_figures(before)
        teacher = evaluation(roles, job.test, cfg, who="teacher") if roles.teacher else {}
        st.teacher_accuracy = teacher.get("accuracy")
        st.teacher_episodes = {k: v for k, v in teacher.items() if k != "accuracy"}
        log.held_out("before training", before)
    plan = route_plan(cfg)
    samples_log = SampleLog(job.run_dir, st.step, cfg.run.log_samples)
    for step in range(st.step, cfg.trainer.total_steps):
        t0 = time.perf_counter()
        # Scored chunk by chunk as it was generated (max_staleness > 0: the next batches are launched here and
        # scored while the learner trains); handed out once the last sync's probe passed (its loads ran
        # meanwhile).
        taken = stream.take(step, cfg.trainer.total_steps)
        batch = route(taken.batch, taken.rewards, taken.scores, plan, job.render)
        stats = ray.get(roles.learner.train_step.remote(batch)) if batch else {"update_skipped": 1.0}
        stats["sample_staleness"] = float(st.version - taken.batch.weight_version)
        st.version = sync_weights(roles, job.probe_ids, cfg.rollout.probe_tolerance)
        # replacements so far in this driver process
        stats["rollout_worker_restarts"] = float(roles.rollout.restarts)
        st.step, st.cursor, st.consumed = step + 1, stream.data.cursor, st.consumed + len(taken.batch.samples)
        if cfg.eval.every and st.step % cfg.eval.every == 0:
            stats.update(held_out(roles, job.test, cfg))
        samples_log.log(step, taken, batch)
        log.log(step, step_metrics(taken, stats, st.version, time.perf_counter() - t0))
        if (st.step == cfg.trainer.total_steps
                or (cfg.checkpoint.every and st.step % cfg.checkpoint.every == 0)):
            _save(cfg, job, roles, st, stream)
    after = held_out(roles, job.test, cfg)
    log.held_out("after training", after)
    log.close()
    summary = {
        "algorithm": cfg.algorithm,
        "teacher_accuracy": st.teacher_accuracy,
        "student_accuracy_before": st.accuracy_before,
        "student_accuracy_after": after["eval_accuracy"],
        "teacher_kl_before": st.teacher_kl_before,  # held-out KL(student || teacher) per token
        "teacher_kl_after": after.get("eval_teacher_kl"),
        # a teacher of another tokenizer: the share of the held-out tokens that KL covers
        **({"cross_scored_fraction_after": after["eval_cross_scored_fraction"]}
           if "eval_cross_scored_fraction" in after else {}),
        **({"student_episodes_before": st.episodes_before, "student_episodes_after": episode_figures(after),
            "teacher_episodes": st.teacher_episodes} if st.episodes_before else {}),
        "eval_prompts": len(job.test),
        "steps": st.step,
        "samples_trained": st.consumed,
        "weight_version": st.version,
        "wall_seconds": round(time.perf_counter() - wall0, 1),
    }
    (job.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
