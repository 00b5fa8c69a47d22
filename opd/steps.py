"""The driver's named steps, each a thin call into the role actors. Feature branches live here, not in the
loop."""

from __future__ import annotations

import logging
import threading

import ray

from opd.agents import episode_setup
from opd.agents.metrics import episode_metrics, held_out_episodes
from opd.cluster import Roles
from opd.config import Config
from opd.rollout.stream import Scored, launch, split_even
from opd.teacher.multi import TeacherCall, teacher_name
from opd.trainer.routing import teacher_reverse_kl
from opd.types import Prompt, Rewards, RolloutBatch, Sample, ScoredChunk, TeacherScores

log = logging.getLogger("opd.steps")

# The verifier hosts are shared by the process; an asynchronous stream verifies on its own thread while the
# driver may evaluate, and a host replaced by one caller must not be replaced again by the other.
_VERIFIER_LOCK = threading.Lock()


def sample(roles: Roles, draws: list[tuple[Prompt, int]], step: int, cfg: Config) -> RolloutBatch:
    """One batch generated now (the synchronous path; ``RolloutStream`` runs ahead of the learner)."""
    return launch(roles.rollout, draws, step, cfg.rollout, cfg.run.seed, episodes=episode_setup(cfg)).result()


def _score(roles: Roles, uids: list[str], prompts: list[Prompt], texts: list[str]) -> Rewards:
    """Verifiers get the dataset's prompt column and every other column as TRL-style keyword lists."""
    columns = {k: [p.columns[k] for p in prompts] for k in prompts[0].columns if k != "prompt"}
    with _VERIFIER_LOCK:
        return roles.verifiers.score(uids, [p.columns["prompt"] for p in prompts], texts, columns)


def _verify(roles: Roles, samples: list[Sample]) -> Rewards:
    """The verifiers' rewards; an episode's adds its environment's (``Episode.env_reward``)."""
    rewards = _score(roles, [s.uid for s in samples], [s.prompt for s in samples],
                     [s.response_text for s in samples])
    rewards.rewards = [r + (s.episode.env_reward if s.episode else 0.0)
                       for r, s in zip(rewards.rewards, samples, strict=True)]
    return rewards


class ChunkScorer:
    """The driver's ``opd.rollout.stream.Scorer``: scores a batch chunk by chunk (a chunk: one generation call
    of a rollout worker), off the driver's main thread.

    ``chain`` runs when a chunk is issued: a chunk whose rows all go to one teacher is handed to that teacher
    actor as the generation's ObjectRef, so scoring starts the moment generation ends. ``chunk`` runs on the
    stream's thread as each chunk arrives: it verifies the chunk (and starts the teacher on a chunk of mixed
    teachers)."""

    def __init__(self, roles: Roles, cfg: Config):
        signal = cfg.teacher_signal  # only what the learner reads: no top-k rows for sampled-token objectives
        self.roles, self.top_k, self.hidden = roles, signal.top_k, signal.hidden
        self.teacher = roles.teacher if signal.scored_by_actor else None

    def chain(self, draws: list[tuple[Prompt, int]], samples_ref: ray.ObjectRef) -> ray.ObjectRef | None:
        teachers = self.teacher
        names = {teacher_name(p, teachers.column) for p, _ in draws} if teachers else set()
        return (teachers.actors[names.pop()].score.remote(samples_ref, self.top_k, self.hidden)
                if len(names) == 1 else None)

    def chunk(self, samples: list[Sample], teacher_ref: ray.ObjectRef | None) -> ScoredChunk:
        if self.teacher is None:
            teacher = None
        elif teacher_ref is not None:
            teacher = TeacherCall.whole(samples, teacher_ref)
        else:
            teacher = self.teacher.submit(samples, self.top_k, self.hidden)
        rewards = _verify(self.roles, samples)
        rewards.validate(samples)
        return ScoredChunk(rewards, teacher)

    def merge(self, batch: RolloutBatch, parts: list[ScoredChunk]) -> Scored:
        rewards = Rewards.concat([p.rewards for p in parts])
        rewards.validate(batch.samples)
        if self.teacher is None:
            return Scored(batch, rewards)
        scores = TeacherScores.concat([p.teacher.result() for p in parts])
        scores.validate(batch.samples)
        return Scored(batch, rewards, scores)


def sync_weights(roles: Roles, probe_ids: list[int], tolerance: float) -> int:
    """Publish the learner's weights to every rollout worker; each verifies them with the probe sequence.

    Returns the version at once: the loads run while the driver goes on (the learner's next step, the next
    batch's scoring), and the rollout pool checks the probe (``RolloutPool.checked``) before anything
    generated at this version is handed out, stored or evaluated. The exported weights and the probe's
    expected log-probs go to the workers as ObjectRefs, never through the driver. A LoRA student publishes its
    adapter's files instead (the engines keep their base weights); workers on other nodes need no shared file
    system either way. Colocated (``cluster.colocate``), the learner copies them into its own engine
    (``Colocated.sync_in_place``)."""
    learner = roles.learner
    if roles.rollout.colocated:  # the engine is in the learner's process: one call copies and probes
        version = ray.get(learner.version_number.remote())
        roles.rollout.publish(version, lambda w: w.sync_in_place.remote(version, probe_ids, tolerance))
        return version
    version, lora = ray.get([learner.version_number.remote(), learner.uses_lora.remote()])
    expected = learner.probe_logprobs.remote(probe_ids)
    if lora:
        files = learner.export_adapter.remote()
        load = lambda w: w.load_adapter.remote(files, version, probe_ids, expected, tolerance)  # noqa: E731
    else:
        weights = learner.export_weights.remote()
        load = lambda w: w.load_weights.remote(weights, version, probe_ids, expected, tolerance)  # noqa: E731
    # The pool keeps ``load`` while generations launched at this version are owed: a replacement worker
    # replays them.
    roles.rollout.publish(version, load)
    return version


def warm_up_verifiers(roles: Roles, prompt: Prompt) -> None:
    """Load the verifier functions in their hosts before any deadline applies (imports take seconds on a busy
    machine)."""
    _score(roles, ["warmup"], [prompt], [prompt.answer])


def evaluate(roles: Roles, prompts: list[Prompt], cfg: Config, who: str) -> float:
    """Greedy held-out accuracy (by the first verifier) of the student's engines or the teacher's."""
    return evaluation(roles, prompts, cfg, who)["accuracy"]


def evaluation(roles: Roles, prompts: list[Prompt], cfg: Config, who: str) -> dict[str, float]:
    """``accuracy``, and on an agent job what the greedy episodes did (``opd.agents.metrics.held_out``)."""
    ids, episodes = [p.token_ids for p in prompts], None
    if who == "teacher" and cfg.agent.environment is not None:  # the teacher plays the same episodes
        episodes = teacher_episodes(roles.teacher, prompts, cfg)
    elif who == "teacher":
        texts = roles.teacher.generate_greedy(prompts, cfg.eval.max_new_tokens)
    elif cfg.agent.environment is not None:  # greedy episodes; the last turn is the answer
        kw = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": cfg.eval.max_new_tokens, "seed": 0,
              "episodes": episode_setup(cfg)}
        parts = [c for c in split_even([(p, 0) for p in prompts], len(roles.rollout)) if c]
        outs = roles.rollout.map(lambda w, c: w.generate.remote(c, **kw), parts)
        episodes = [s for samples, _ in outs for s in samples]
    else:
        parts = [c for c in split_even(ids, len(roles.rollout)) if c]
        outs = roles.rollout.map(lambda w, c: w.generate_greedy.remote(c, cfg.eval.max_new_tokens), parts)
        texts = [t for part in outs for t in part]
    if episodes is not None:
        texts = [s.response_text for s in episodes]
    correct = _verify_all(roles, [f"eval/{p.prompt_id}" for p in prompts], prompts, texts)
    return {"accuracy": sum(correct) / len(prompts), **(held_out_episodes(episodes) if episodes else {})}


def teacher_episodes(teacher, prompts: list[Prompt], cfg: Config) -> list[Sample]:
    """Each row's greedy episode played by its own teacher (``teacher.column``), in order; ``teacher``:
    ``opd.teacher.multi``'s ``generate_greedy(prompts, max_tokens)``."""
    from opd.agents.teacher import greedy_episodes
    from opd.preflight import student_tokenizer

    tok, column, out = student_tokenizer(cfg), cfg.teacher.column, [None] * len(prompts)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(teacher_name(p, column), []).append(i)
    for name, idx in groups.items():
        cols = {column: name} if column else {}

        def answer(ids_list, max_tokens, cols=cols):
            turns = [Prompt("turn", "", ids, "", cols) for ids in ids_list]
            return teacher.generate_greedy(turns, max_tokens)

        samples = greedy_episodes(answer, [prompts[i] for i in idx], episode_setup(cfg), tok,
                                  cfg.eval.max_new_tokens)
        for i, s in zip(idx, samples, strict=True):
            out[i] = s
    return out


def held_out(roles: Roles, prompts: list[Prompt], cfg: Config) -> dict[str, float]:
    """The student's held-out figures: ``eval_accuracy`` (greedy; on an agent job with its episodes'
    ``eval_tool_call_rate``, ``eval_turns``...) and, with a teacher, ``eval_teacher_kl`` (with a teacher of
    another tokenizer also ``eval_cross_scored_fraction``, the share of tokens that KL covers)."""
    return {f"eval_{k}": v for k, v in evaluation(roles, prompts, cfg, who="student").items()} | (
        heldout_teacher_kl(roles, prompts, cfg))


def heldout_teacher_kl(roles: Roles, prompts: list[Prompt], cfg: Config) -> dict[str, float]:
    """KL(student || teacher) per token on held-out prompts: ``eval.kl_samples`` samples of the student per
    prompt at temperature 1 (seeded: the same draws each time the same weights are measured), scored by the
    teacher; the mean of log q - log pi_T over their tokens, the training metric ``teacher_kl`` measured where
    nothing trains. Empty when the job has no teacher, ``eval.kl_samples`` is 0 or the teacher scored no
    token."""
    if roles.teacher is None or not cfg.eval.kl_samples:
        return {}
    draws = [(p, 0) for p in prompts]
    kw = {"n": cfg.eval.kl_samples, "temperature": 1.0, "top_p": 1.0,
          "max_tokens": cfg.rollout.max_new_tokens, "seed": cfg.run.seed, "episodes": episode_setup(cfg)}
    parts = [c for c in split_even(draws, len(roles.rollout)) if c]
    outs = roles.rollout.map(lambda w, c: w.generate.remote(c, **kw), parts)
    rollouts = RolloutBatch(-1, [s for samples, _ in outs for s in samples], cfg.eval.kl_samples, -1)
    scores = roles.teacher.submit(rollouts.samples, 0).result()
    kl = teacher_reverse_kl(rollouts, scores)
    cross = cross_metrics(scores.cross_counts)
    return ({} if kl is None else {"eval_teacher_kl": kl}) | (
        {"eval_cross_scored_fraction": cross["cross_scored_fraction"]} if cross else {})


def _verify_all(roles: Roles, uids: list[str], prompts: list[Prompt], texts: list[str],
                retries: int = 1) -> list[bool]:
    """Correctness of every row. A verifier failure (timeout on a loaded machine, crash) is retried, never
    counted as a wrong answer: an accuracy built on failed verifications would be a silent lie."""
    rewards = _score(roles, uids, prompts, texts)
    failed = [i for i, uid in enumerate(uids) if uid in rewards.failures]
    if not failed:
        return list(rewards.correct)
    if retries <= 0:
        first = rewards.failures[uids[failed[0]]]
        raise RuntimeError(f"evaluation: {len(failed)} of {len(uids)} rows could not be verified "
                           f"(first: {first})")
    log.warning("evaluation: %d rows failed verification (%s); retrying them", len(failed),
                rewards.failures[uids[failed[0]]])
    again = _verify_all(roles, [uids[i] for i in failed], [prompts[i] for i in failed],
                        [texts[i] for i in failed], retries - 1)
    correct = list(rewards.correct)
    for i, ok in zip(failed, again, strict=True):
        correct[i] = ok
    return correct


def step_metrics(taken: Scored, learner: dict, version: int, step_seconds: float) -> dict[str, float]:
    rollouts, rewards, scores = taken.batch, taken.rewards, taken.scores
    n_tok = rollouts.num_response_tokens
    m = {
        "reward": sum(rewards.rewards) / len(rewards.rewards),
        "accuracy": sum(rewards.correct) / len(rewards.correct),
        "verifier_failures": float(len(rewards.failures)),
        "response_length": n_tok / len(rollouts.samples),
        "rollout_tokens_per_s": n_tok / max(rollouts.generate_seconds, 1e-9),
        "generate_seconds": rollouts.generate_seconds,
        "verify_seconds": rewards.verify_seconds,
        "weight_version": float(version),
        "probe_max_diff": taken.probe_max_diff,
        "step_seconds": step_seconds,
        **learner,
    }
    # rollout.dynamic_sampling: the share of generated groups that taught
    if taken.generated_groups is not None:
        m["dynamic_kept_fraction"] = (len(rollouts.samples) / rollouts.group_size
                                      / max(taken.generated_groups, 1))
        m["resample_rounds"] = float(taken.resample_rounds)
    m.update(episode_metrics(rollouts, scores))
    if scores is not None:
        if (kl := teacher_reverse_kl(rollouts, scores)) is not None:  # None: the teacher scored no token
            m["teacher_kl"] = kl
        m["teacher_nonfinite"] = float(scores.nonfinite_samples())
        m["score_tokens_per_s"] = n_tok / max(scores.score_seconds, 1e-9)
        m["score_seconds"] = scores.score_seconds
        m.update(cross_metrics(scores.cross_counts))
    return m


def cross_metrics(counts: dict[str, float] | None) -> dict[str, float]:
    """A teacher with another tokenizer (``opd.teacher.cross_teacher``): the share of chunks that are one
    token on both sides, a chunk's mean length in student tokens, the share of student tokens the teacher
    scored, teacher tokens per student token, and with top-k rows the share of the teacher's top-k mass whose
    tokens the student's vocabulary has (the rest goes to the tail bucket)."""
    if counts is None:
        return {}
    chunks, student = max(counts["chunks"], 1), max(counts["student_tokens"], 1)
    return {"cross_one_to_one": counts["one_to_one"] / chunks,
            "cross_chunk_tokens": counts["scored_tokens"] / chunks,
            "cross_scored_fraction": counts["scored_tokens"] / student,
            "cross_teacher_tokens_per_token": counts["teacher_tokens"] / student,
            **({"cross_topk_matched_mass": counts["topk_matched_mass"] / max(counts["topk_mass"], 1e-12)}
               if counts["topk_rows"] else {})}
