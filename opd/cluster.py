"""Ray start-up and actor placement: the only module that knows how roles map onto hardware.

With no address an embedded local Ray starts (the laptop default); with one, the job joins that cluster.
Actors are named ``<run>/<role>-<i>`` so the dashboard's actor view reads as the pipeline. Several learner
ranks (``trainer.num_ranks``) sit in one placement group that may span nodes; rank 0 is the learner the driver
talks to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from opd.colocated import Colocated
from opd.config import Config
from opd.plan import learner_args
from opd.preflight import teacher_template
from opd.rewards import VerifierRunner
from opd.rollout.engine import ACTOR_ENV
from opd.rollout.pool import RolloutPool
from opd.rollout.worker import RolloutWorker
from opd.teacher.cross_teacher import CrossTeacher
from opd.teacher.http import HTTPTeacher
from opd.teacher.multi import DEFAULT, Teachers
from opd.teacher.openai import OpenAITeacher
from opd.teacher.scorer import VLLMTeacher
from opd.trainer.device import learner_placement
from opd.trainer.learner import Learner


@dataclass
class LearnerGroup:
    ranks: list  # Learner actor handles, rank 0 first
    placement_group: object | None = None  # one bundle per rank; None for a single rank


@dataclass
class Roles:
    rollout: list  # RolloutWorker actor handles
    teacher: Teachers | None  # VLLMTeacher / HTTPTeacher actors by name
    learner: object  # Learner actor handle (rank 0: the only one the driver calls)
    verifiers: VerifierRunner
    learner_group: LearnerGroup | None = None  # every rank, for stop_roles

    def __post_init__(self):
        # A bare list (``opd eval``, tests) becomes a pool that cannot restart; start_roles builds one that
        # can.
        if not isinstance(self.rollout, RolloutPool):
            self.rollout = RolloutPool(list(self.rollout))


def cpus_needed(cfg: Config) -> int:
    """Ray CPUs a job's actors ask for: rollout workers, teachers and learner ranks (verifier hosts ask for
    none). Logical CPUs: one per role lets every actor schedule even on a 2-core laptop, where the stages take
    turns. The teacher slot is counted even when this job has no local teacher: a later job in the same
    process (a benchmark) may start one."""
    return (cfg.rollout.num_workers * cfg.rollout.num_cpus
            + (len(cfg.models.teachers) + 1) * cfg.teacher.num_cpus
            + cfg.trainer.num_ranks)


def init_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": ACTOR_ENV}
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, runtime_env=runtime_env, log_to_driver=True)
        return
    ray.init(
        address="local",
        num_cpus=max(cfg.cluster.num_cpus or os.cpu_count() or 1, cpus_needed(cfg)),
        include_dashboard=cfg.cluster.include_dashboard,
        runtime_env=runtime_env,
    )


def start_roles(cfg: Config) -> Roles:
    name = cfg.run.name
    # The learners' placement group first: it reserves the ranks' CPUs (one per node with STRICT_SPREAD)
    # before the engines, which schedule anywhere, can take them.
    learners = start_learners(cfg)
    if cfg.cluster.colocate:  # rank 0 is the one engine too; it dies with the learner, so no restarts
        rollout = RolloutPool(learners.ranks[:1], colocated=True)
    else:
        start = lambda i: start_rollout_worker(cfg, i, prefix=f"{name}/")  # noqa: E731
        rollout = RolloutPool([start(i) for i in range(cfg.rollout.num_workers)], start,
                              cfg.rollout.max_restarts, cfg.cluster.start_timeout_s)
    teacher = start_teachers(cfg, prefix=f"{name}/") if cfg.needs_teacher else None
    verifiers = start_verifiers(cfg)
    # Surface engine start-up failures here, not at the first step, and an actor the cluster cannot place as
    # an error rather than a silent wait.
    _wait_placed(list({id(a): a for a in [*rollout, *(teacher.actors.values() if teacher else []),
                                          *learners.ranks]}.values()), cfg.cluster.start_timeout_s)
    connect_learners(learners, cfg.trainer.dist_backend, cfg.trainer.strategy)
    return Roles(rollout, teacher, learners.ranks[0], verifiers, learners)


def start_rollout_worker(cfg: Config, i: int, prefix: str | None = None):
    """Rollout worker ``i`` (named ``<prefix>rollout-<i>`` when ``prefix`` is given) with the engine
    ``rollout.engine`` picks; the pool calls this again, same options and name, to replace a dead one."""
    opts = {"name": f"{prefix}rollout-{i}"} if prefix else {}
    return (ray.remote(RolloutWorker).options(num_cpus=cfg.rollout.num_cpus, max_concurrency=1, **opts)
            .remote(**worker_args(cfg, i)))


def worker_args(cfg: Config, i: int) -> dict:
    """Rollout worker ``i``'s keyword arguments (its own actor, or inside the learner with
    ``cluster.colocate``)."""
    return dict(model_dir=cfg.models.student, seed=cfg.run.seed + i, max_model_len=cfg.rollout.max_model_len,
                kv_cache_gib=cfg.rollout.kv_cache_gib, dtype=cfg.models.dtype, worker_id=i,
                lora_rank=cfg.lora.r, engine=cfg.rollout.engine)


def start_verifiers(cfg: Config) -> VerifierRunner:
    v = cfg.verifiers
    return VerifierRunner(v.functions, timeout_s=v.timeout_s,
                          chunk_size=v.chunk_size, num_workers=v.num_workers, job=cfg.run.name)


def start_learners(cfg: Config) -> LearnerGroup:
    """``trainer.num_ranks`` Learner actors, ``<run>/learner-<rank>``. One rank is a plain actor; several
    share a placement group, one bundle per rank (``{"CPU": 1}``, plus ``{"GPU": 1}`` where ranks run on
    CUDA), spread over nodes as ``trainer.placement_strategy`` says. Whether a rank holds a GPU, and so which
    device it runs on, is decided once, by ``learner_placement``, for one rank and several alike. Every rank
    loads the student (and the reference model or self-teacher its objective needs): the ranks must hold
    identical copies. Call
    ``connect_learners`` once they run.
    """
    t = cfg.trainer
    device, gpu = learner_placement(t.device, t.dist_backend, t.num_ranks,
                                    ray.cluster_resources().get("GPU", 0))

    def rank(r: int, **opts):
        if r == 0 and cfg.cluster.colocate:  # the roles take turns in one process: the larger reservation
            return ray.remote(Colocated).options(
                name=f"{cfg.run.name}/learner-0", num_cpus=max(1, cfg.rollout.num_cpus), num_gpus=int(gpu),
                max_concurrency=1, **opts).remote(worker=worker_args(cfg, 0), **learner_args(cfg),
                                                  engine_threads=cfg.rollout.num_cpus, device=device)
        return ray.remote(Learner).options(name=f"{cfg.run.name}/learner-{r}", num_cpus=1, num_gpus=int(gpu),
                                           **opts).remote(**learner_args(cfg), device=device)

    if t.num_ranks == 1:
        return LearnerGroup([rank(0)])
    bundle = {"CPU": 1, **({"GPU": 1} if gpu else {})}
    pg = placement_group([bundle] * t.num_ranks, strategy=t.placement_strategy,
                         name=f"{cfg.run.name}/learners")
    ready, _ = ray.wait([pg.ready()], timeout=cfg.cluster.start_timeout_s)
    if not ready:
        remove_placement_group(pg)
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        raise RuntimeError(
            f"trainer.num_ranks={t.num_ranks} with trainer.placement_strategy={t.placement_strategy}: "
            f"the cluster ({nodes} nodes) could not place {t.num_ranks} bundles of {bundle} within "
            f"cluster.start_timeout_s={cfg.cluster.start_timeout_s:g}s. STRICT_SPREAD needs that many nodes; "
            "free resources or add nodes."
        )
    return LearnerGroup(
        [rank(r, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r))
         for r in range(t.num_ranks)],
        pg,
    )


def connect_learners(group: LearnerGroup, backend: str, strategy: str) -> None:
    """Rendezvous: rank 0's node IP (from the placement group) and a free port there host the process group's
    store; every rank calls ``init_process_group`` concurrently (it returns once all have joined); then rank 0
    gets the handles of ranks 1..N-1. Across real nodes gloo must find the right network interface: set
    ``GLOO_SOCKET_IFNAME`` (or ``NCCL_SOCKET_IFNAME``) in the cluster's environment where the hostname
    resolves to a loopback address."""
    n = len(group.ranks)
    if n == 1:
        return
    node_id = placement_group_table(group.placement_group)["bundles_to_node_id"][0]
    host = next(node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == node_id)
    port = ray.get(group.ranks[0].free_port.remote())
    ray.get([actor.join_group.remote(r, n, host, port, backend, strategy)
             for r, actor in enumerate(group.ranks)])
    ray.get(group.ranks[0].set_peers.remote(group.ranks[1:]))


def _wait_placed(actors: list, timeout_s: float) -> None:
    refs = [a.__ray_ready__.remote() for a in actors]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise RuntimeError(
            f"{len(pending)} of {len(refs)} actors did not start within "
            f"cluster.start_timeout_s={timeout_s:g}s; the cluster has "
            f"{ray.available_resources().get('CPU', 0):g} of {ray.cluster_resources().get('CPU', 0):g} CPUs "
            f"and {ray.available_resources().get('GPU', 0):g} of {ray.cluster_resources().get('GPU', 0):g} "
            "GPUs free (each engine and learner rank takes a CPU; a learner rank on CUDA a GPU too, "
            "trainer.device). Free resources, or raise the timeout for slow model loads."
        )
    ray.get(refs)  # re-raises an actor's start-up error


def start_teachers(cfg: Config, prefix: str | None = None, max_logprobs: int | None = None) -> Teachers:
    """The default teacher (a local vLLM engine, or with ``teacher.url`` an HTTP client of a running teacher
    server) and one local engine per ``models.teachers`` entry; ``prefix`` names the actors
    (``run/teacher-NAME``).

    The HTTP client needs no CPU of its own (it waits on the network). Its token is read here, in the driver,
    and handed to the actor, so a cluster's workers need no copy of the variable."""
    opts = lambda n: {"name": f"{prefix}teacher-{n}"} if prefix else {}  # noqa: E731
    t = cfg.teacher
    if t.url:
        token = os.environ.get(t.token_env) if t.token_env else None
        retry = {"timeout_s": t.timeout_s, "retry_deadline_s": t.retry_deadline_s}
        if t.protocol == "openai":
            default = ray.remote(OpenAITeacher).options(num_cpus=0, **opts(DEFAULT)).remote(
                t.url, t.model, token, **retry)
        else:
            default = ray.remote(HTTPTeacher).options(num_cpus=0, **opts(DEFAULT)).remote(
                t.url, token, **retry)
    else:
        default = _local_teacher(cfg, cfg.models.teacher, opts(DEFAULT), max_logprobs,
                                 cross=t.tokenizer == "cross")
    others = {n: _local_teacher(cfg, d, opts(n), max_logprobs) for n, d in cfg.models.teachers.items()}
    return Teachers({DEFAULT: default, **others}, column=t.column,
                    cross={DEFAULT} if t.tokenizer == "cross" else set())


def _local_teacher(cfg: Config, model_dir: str, opts: dict, max_logprobs: int | None, cross: bool = False):
    """A local engine actor; ``cross``: behind ``CrossTeacher``, which scores the student's samples by bytes
    (``teacher.tokenizer=cross``, as the pre-flight decided)."""
    kwargs = {"seed": cfg.run.seed, "max_model_len": cfg.rollout.max_model_len,
              "kv_cache_gib": cfg.rollout.kv_cache_gib, "dtype": cfg.models.dtype,
              "max_logprobs": max_logprobs or cfg.teacher.max_logprobs, "engine": cfg.teacher_engine}
    actor = ray.remote(CrossTeacher if cross else VLLMTeacher).options(num_cpus=cfg.teacher.num_cpus, **opts)
    if not cross:
        return actor.remote(model_dir, **kwargs)
    return actor.remote((VLLMTeacher, (model_dir,), kwargs), (cfg.models.student, cfg.models.chat_template),
                        (model_dir, teacher_template(cfg, model_dir)),
                        map_topk=cfg.teacher_settings.divergence != "uld")


def stop_roles(roles: Roles | None) -> None:
    if roles is None:
        return
    learners = roles.learner_group.ranks if roles.learner_group else [roles.learner]
    actors = [*roles.rollout, *(roles.teacher.actors.values() if roles.teacher else ()), *learners]
    for actor in {id(a): a for a in actors if a is not None}.values():  # a colocated rank 0 is listed twice
        ray.kill(actor)
    if roles.learner_group and roles.learner_group.placement_group is not None:
        remove_placement_group(roles.learner_group.placement_group)
