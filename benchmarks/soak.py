"""Soak: one seeded job under a seeded schedule of injected faults; every sample must be trained exactly once.

    python benchmarks/soak.py  # demo models, 40 steps, prints JSON, writes benchmarks/results/soak.json
    python benchmarks/soak.py --quick --models DIR --out DIR
    python benchmarks/soak.py --steps 60 --seed 3 rollout.engine=vllm  # trailing key=value: config overrides
    python benchmarks/soak.py --agent  # episodes whose tool misbehaves; writes results/soak_agent.json

The job runs as ``python -m opd.cli run`` in its own session (it owns an embedded Ray), two rollout workers
generating one step ahead, a checkpoint every few steps, ``run.log_samples=true``. Faults, all from outside
the
job (no test hooks in ``opd``):

* ``rollout_worker_kill``: a rollout worker's process SIGKILLed at a random moment of a step (as the OOM
killer would);
* ``driver_sigkill``: the driver's whole process tree SIGKILLed at a random moment, then restarted with
``--resume``;
* ``verifier_<kind>``: ``benchmarks/soak_faults.py:flaky_verifier``, listed after ``exact_answer``, raises,
hangs past
  ``verifiers.timeout_s``, returns NaN, returns a short list, or kills its own process on seeded calls;
* with ``--agent``, ``tool_<kind>``: every draw is a two-turn episode whose tool
  (``soak_faults.FlakyTools``) raises, hangs past its timeout, returns a megabyte or has its sandbox killed on
  seeded calls; survived when a trained sample of that prompt holds the fault's observation;
* with ``--teacher-server`` (default on, off with ``--quick``) the teacher is ``opd serve-teacher`` behind
  ``soak_faults.FlakyTeacherProxy``: ``teacher_outage`` cuts every connection for 20 s (the client retries),
  and
  ``teacher_nan`` turns a top-k log-prob of seeded /v1/score replies into NaN, which the pipeline carries into
  a non-finite loss: the learner skips that update.

A fault is survived when the job went on past it: for a worker kill, a later step completed in the same driver
with the restart counted (``rollout_worker_restarts``); for a driver kill, the resumed driver completed a step
after the one killed; for a verifier fault, every row it hit is in the final ``samples.jsonl`` with the
failure recorded; for a teacher outage, a step completed after it; for a NaN reply, a step that trained that
prompt skipped its update.
``samples_lost``: ids the schedule (steps x prompts_per_step x G, the prompt order of the run's seed) should
have trained that the final ``samples.jsonl`` lacks or marks untrained; ``samples_duplicated``: extra copies
of ids. Exit code 1 when anything was lost, duplicated or not survived, or the job did not finish.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FAULTS_FILE = ROOT / "benchmarks" / "soak_faults.py"
VERIFIER = f"{FAULTS_FILE}:flaky_verifier"
OUTAGE_S = 20.0  # teacher server unreachable this long (well inside teacher.retry_deadline_s)


def job_config(args, run_dir: Path, work: Path) -> dict:
    """The job's config tree: tiny steps, two workers one step ahead, the flaky verifier after
    exact_answer."""
    from opd.config import dump_config, load_config

    p = {"steps": args.steps or (8 if args.quick else 40), "prompts": 4 if args.quick else 8,
         "every": 2 if args.quick else 5, "rate": 0.35 if args.quick else 0.08}
    over = {
        "run.name": "soak", "run.output_dir": str(run_dir), "run.seed": args.seed, "run.log_samples": True,
        "models.student": str(args.models / "student"), "models.teacher": str(args.models / "teacher"),
        "task.num_train": 100 if args.quick else 200, "task.num_test": 20, "eval.num_prompts": 20,
        "eval.every": 0,
        "rollout.num_workers": 2, "rollout.max_staleness": 1, "rollout.prompts_per_step": p["prompts"],
        "rollout.group_size": 2, "rollout.engine": "hf", "rollout.max_restarts": 8,
        "trainer.total_steps": p["steps"], "trainer.warmup_steps": 2, "checkpoint.every": p["every"],
        "checkpoint.keep": 2, "verifiers.timeout_s": 5.0, "verifiers.chunk_size": 4,
        "cluster.start_timeout_s": 900,
    }
    if args.agent:  # two-turn episodes whose tool misbehaves (soak_faults.FlakyTools)
        over.update({
            "agent.environment": f"{FAULTS_FILE}:FlakyTools", "agent.max_observation_tokens": 56,
            "agent.env_kwargs": json.dumps({"seed": args.seed, "rate": 0.5 if args.quick else 0.25,
                                            "log_path": str(work / "tool_faults.jsonl"),
                                            "skip_prompts_path": str(work / "heldout_prompts.json")}),
            "rollout.max_model_len": 128})
    cfg = yaml.safe_load(dump_config(load_config(ROOT / "configs" / "demo.yaml",
                                                 [f"{k}={_yaml(v)}" for k, v in over.items()]
                                                 + list(args.overrides))))
    cfg["verifiers"]["functions"] = [
        {"name": "exact_answer", "weight": 1.0, "kwargs": {}},
        {"name": VERIFIER, "weight": 0.0, "kwargs": {
            "seed": args.seed, "rate": p["rate"], "log_path": str(work / "verifier_faults.jsonl"),
            "skip_prompts_path": str(work / "heldout_prompts.json"), "hang_s": 60.0}},
    ]
    return cfg


def _yaml(v) -> str:
    return json.dumps(v) if isinstance(v, bool) else str(v)


class Schedule:
    """Seeded steps and moments of the process faults. The driver is killed once (after the first checkpoint);
    the rollout workers are killed at other steps, away from the driver kill so each one's outcome is
    observable."""

    def __init__(self, rng: random.Random, steps: int, every: int, worker_kills: int, teacher_outage: bool):
        lo = every + 1
        self.driver = rng.randint(lo, max(lo, steps - 3)) if steps > lo + 1 else None
        free = [s for s in range(1, steps - 1) if self.driver is None or abs(s - self.driver) > 1]
        picked = rng.sample(free, min(worker_kills + int(teacher_outage), len(free)))
        self.teacher = picked.pop() if teacher_outage and picked else None
        self.workers = sorted(picked)
        self.delays = {s: rng.random() for s in [*self.workers, self.driver, self.teacher] if s is not None}

    def faults(self) -> list[tuple[str, int | None]]:
        return ([("rollout_worker_kill", s) for s in self.workers] + [("teacher_outage", self.teacher)]
                + [("driver_sigkill", self.driver)])


class Watch:
    """Follows the driver through ``metrics.jsonl`` and injects the scheduled process faults as steps go
    by."""

    def __init__(self, run_dir: Path, schedule: Schedule, rng: random.Random, proxy=None):
        self.metrics = run_dir / "metrics.jsonl"
        self.schedule, self.rng, self.proxy = schedule, rng, proxy
        self.events: list[dict] = []  # one per injected process fault
        self.seen: list[dict] = []  # metrics lines as observed live, with the attempt that wrote them

    def lines(self) -> list[dict]:
        try:
            text = self.metrics.read_text()
        except FileNotFoundError:
            return []
        out = []
        for ln in text.splitlines():
            try:
                out.append(json.loads(ln))
            except ValueError:
                pass  # a line being written
        return out

    def wait_inside_step(self, proc: subprocess.Popen, lines_now: int, delay_s: float) -> None:
        """A random moment inside the step: ``delay_s``, cut short when the step ends (a new metrics line) or
        the driver exits, so a fault never lands after the run has moved on, however fast its steps are."""
        until = time.monotonic() + delay_s
        while time.monotonic() < until and proc.poll() is None and len(self.lines()) <= lines_now:
            time.sleep(0.05)

    def follow(self, proc: subprocess.Popen, attempt: int) -> bool:
        """Until the driver exits; True when this watcher killed it (the driver fault)."""
        step_s: list[float] = []
        done_faults = {(e["kind"], e["step"]) for e in self.events}
        last = None
        while proc.poll() is None:
            rows = self.lines()
            if rows and rows[-1] != last:
                last = rows[-1]
                self.seen.append({**last, "attempt": attempt, "seen_at": time.time()})
                step_s.append(float(last.get("step_seconds", 1.0)))
            completed = rows[-1]["step"] + 1 if rows else 0
            typical = statistics.median(step_s[-5:]) if step_s else 2.0
            for kind, step in self.schedule.faults():
                if step is None or (kind, step) in done_faults or completed < step:
                    continue
                done_faults.add((kind, step))
                self.wait_inside_step(proc, len(rows), self.schedule.delays[step] * typical)
                if proc.poll() is not None:
                    break
                if kind == "driver_sigkill":
                    self.events.append({"kind": kind, "step": step, "attempt": attempt, "at": time.time()})
                    kill_session(proc)
                    return True
                if kind == "teacher_outage":
                    self.proxy.take_down(OUTAGE_S)
                    self.events.append({"kind": kind, "step": step, "attempt": attempt,
                                        "at": time.time() + OUTAGE_S})
                    continue
                victims = sorted(p.pid for p in session(proc) if _title(p).startswith("ray::RolloutWorker"))
                if victims:
                    pid = self.rng.choice(victims)
                    os.kill(pid, signal.SIGKILL)
                    self.events.append({"kind": kind, "step": step, "attempt": attempt, "at": time.time(),
                                        "pid": pid})
            time.sleep(0.3)
        rows = self.lines()
        if rows and rows[-1] != last:
            self.seen.append({**rows[-1], "attempt": attempt, "seen_at": time.time()})
        return False


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def session(proc: subprocess.Popen) -> list[psutil.Process]:
    """Every process of the driver's session: it, its embedded Ray (GCS, raylet) and the Ray workers, which
    Ray puts in process groups of their own (so killing the driver's group alone would leave them running)."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == proc.pid:
                out.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def kill_session(proc: subprocess.Popen) -> None:
    for _ in range(3):  # a worker can be forked while we kill; a second sweep finds it
        for p in session(proc):
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.5)
    proc.wait()


def run_job(cfg_path: Path, run_dir: Path, work: Path, schedule: Schedule, rng: random.Random,
            timeout_s: float, proxy=None):
    watch = Watch(run_dir, schedule, rng, proxy)
    attempts, rc = [], None
    deadline = time.monotonic() + timeout_s
    for attempt in range(3):
        cmd = ([sys.executable, "-m", "opd.cli", "run", "--no-progress", str(cfg_path)]
               + (["--resume"] if attempt else []))
        with open(work / f"driver-{attempt}.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True,
                                    env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            timer = threading.Timer(max(1.0, deadline - time.monotonic()), kill_session, [proc])
            timer.start()
            try:
                killed = watch.follow(proc, attempt)
                proc.wait()
            finally:
                timer.cancel()
                kill_session(proc)  # leftovers of a finished driver (a Ray worker that outlived it) too
        rc = proc.returncode
        attempts.append({"attempt": attempt, "killed_by_soak": killed, "returncode": rc})
        if not killed:
            break
    return watch, attempts, rc


def count_samples(expected: list[str], rows: list[dict]) -> dict[str, int]:
    """Lost: expected ids with no trained line; duplicated: lines beyond the first of an id; unexpected: ids
    logged that the schedule never drew (a wrong cursor or epoch after a resume)."""
    want = set(expected)
    trained = Counter(r["uid"] for r in rows if r.get("trained", True))
    logged = Counter(r["uid"] for r in rows)
    return {
        "samples_expected": len(expected),
        "samples_lost": sum(1 for u in want if not trained[u]),
        "samples_duplicated": sum(n - 1 for n in logged.values() if n > 1),
        "samples_unexpected": sum(1 for u in logged if u not in want),
    }


def analyse(run_dir: Path, work: Path, watch: Watch) -> dict:
    from soak_faults import EXPECTED_REASON
    from transformers import AutoTokenizer

    from opd.config import load_config
    from opd.data import PromptSource
    from opd.preflight import load_prompts
    from opd.types import sample_uid

    c = load_config(work / "job.yaml")
    tok = AutoTokenizer.from_pretrained(c.models.student)
    train, _ = load_prompts(c, tok)
    source = PromptSource(train, c.run.seed)
    steps, g = c.trainer.total_steps, c.rollout.group_size
    expected = [sample_uid(p.prompt_id, i, epoch) for _ in range(steps)
                for p, epoch in source.next_batch(c.rollout.prompts_per_step) for i in range(g)]
    path = run_dir / "samples.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []

    faults: dict[str, dict[str, int]] = {}

    def count(kind: str, survived: bool) -> None:
        f = faults.setdefault(kind, {"injected": 0, "survived": 0})
        f["injected"] += 1
        f["survived"] += int(survived)

    for e in watch.events:
        later = [s for s in watch.seen
                 if s["attempt"] == e["attempt"] and s["seen_at"] > e["at"] and s["step"] >= e["step"]]
        if e["kind"] == "driver_sigkill":
            resumed = [s for s in watch.seen if s["attempt"] > e["attempt"] and s["step"] >= e["step"]]
            count(e["kind"], bool(resumed))
        elif e["kind"] == "teacher_outage":  # "at" is the end of the outage: a step finished after it
            count(e["kind"], bool(later))
        else:
            kills = sum(1 for x in watch.events
                        if x["kind"] == e["kind"] and x["attempt"] == e["attempt"] and x["at"] <= e["at"])
            count(e["kind"], any(s.get("rollout_worker_restarts", 0) >= kills for s in later))

    # Verifier faults: each distinct call once (a step re-run after the resume meets the same fault again).
    text = {p.prompt_id: p.columns["prompt"] for p in train}
    failures: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        failures.setdefault((text.get(r["prompt_id"], ""), r["response"]), []).append(r.get("failure") or "")
    for f in _distinct_faults(work / "verifier_faults.jsonl"):
        ok = all(any(VERIFIER in why and EXPECTED_REASON[f["kind"]] in why
                     for why in failures.get(tuple(row), []))
                 for row in f["rows"])
        count(f"verifier_{f['kind']}", ok)

    _tool_faults(work, rows, text, tok, count)
    metrics = watch.lines()
    # skipped for a non-finite loss (a step without signal skips too)
    skipped = {m["step"] for m in metrics if m.get("update_skipped") and not m.get("no_signal")}
    steps_of: dict[tuple, set] = {}
    ids = {p.prompt_id: tuple(p.token_ids) for p in train}
    for r in rows:
        steps_of.setdefault(ids.get(r["prompt_id"]), set()).add(r["step"])
    for f in _distinct_faults(work / "teacher_faults.jsonl"):
        # survived: a step that trained that prompt skipped its non-finite update
        count(f["kind"], bool(steps_of.get(tuple(f["prompt_ids"]), set()) & skipped))
    summary = run_dir / "summary.json"
    return {
        "steps": (json.loads(summary.read_text())["steps"] if summary.exists()
                  else (metrics[-1]["step"] + 1 if metrics else 0)),
        "steps_planned": steps,
        "faults_injected": sum(f["injected"] for f in faults.values()),
        "faults_survived": sum(f["survived"] for f in faults.values()),
        **count_samples(expected, rows),
        "faults": dict(sorted(faults.items())),
        "verifier_failed_rows": sum(1 for r in rows if r.get("failure")),
        "updates_skipped": sum(int(m.get("update_skipped", 0)) for m in metrics),
    }


def _tool_faults(work: Path, rows: list[dict], text: dict, tok, count) -> None:
    """Tool faults (``soak_faults.FlakyTools``): survived when a trained sample of that prompt holds the
    fault's observation among its environment tokens (the episode went on past it)."""
    from soak_faults import TOOL_OBSERVATION

    for f in _distinct_faults(work / "tool_faults.jsonl"):
        said = [_bare(tok.decode([t for seg in r.get("segments", []) if seg["origin"] == "environment"
                                  for t in seg["ids"]]))
                for r in rows if r["trained"] and text.get(r["prompt_id"]) == f["prompt"]]
        count(f["kind"], any(_bare(TOOL_OBSERVATION[f["kind"].removeprefix("tool_")]) in s for s in said))


def _distinct_faults(log: Path) -> list[dict]:
    """A fault log's entries, the first of each key: a call re-run after the resume meets the same fault
    again."""
    out, seen = [], set()
    for ln in log.read_text().splitlines() if log.exists() else []:
        f = json.loads(ln)
        if f["key"] not in seen:
            seen.add(f["key"])
            out.append(f)
    return out


def _bare(text: str) -> str:  # the demo's character vocabulary has no space: compare without whitespace
    return "".join(text.split())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40; 8 with --quick)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the job and the fault schedule")
    ap.add_argument("--quick", action="store_true", help="a short run for the test suite")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="soak.json goes here")
    ap.add_argument("--models", type=Path, default=ROOT / "models" / "demo",
                    help="holds student/ and teacher/")
    ap.add_argument("--work", type=Path, default=None,
                    help="run directory and logs (default: a temporary one, removed)")
    ap.add_argument("--worker-kills", type=int, default=None,
                    help="rollout worker kills (default 2; 1 with --quick)")
    ap.add_argument("--teacher-server", action=argparse.BooleanOptionalAction, default=None,
                    help="teacher as `opd serve-teacher` behind a flapping, NaN-injecting proxy "
                         "(default: on, off with --quick)")
    ap.add_argument("--agent", action="store_true",
                    help="multi-turn episodes with a misbehaving tool (raises, hangs, a megabyte, a killed "
                         "sandbox); writes soak_agent.json")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before the whole job is abandoned")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides of the job")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(FAULTS_FILE.parent))

    missing = [str(args.models / m) for m in ("student", "teacher")
               if not (args.models / m / "config.json").is_file()]
    if missing:
        print(f"soak: no checkpoint in {', '.join(missing)}: build the demo models first "
              "(`.venv/bin/opd bootstrap "
              f"--out {args.models}`, or make demo) or pass --models DIR", file=sys.stderr)
        return 2
    if args.work:
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="opd-soak-"))  # mkdtemp creates it
    run_dir = work / "run"
    cfg = job_config(args, run_dir, work)
    t0 = time.perf_counter()
    server, proxy = None, None
    if args.teacher_server if args.teacher_server is not None else not args.quick:
        server, proxy = start_teacher(cfg, work, args.seed, nan_rate=0.3 if args.quick else 0.05)
        cfg["teacher"].update(url=proxy.url, retry_deadline_s=300.0, timeout_s=120.0)
    (work / "job.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _write_heldout(work)

    rng = random.Random(args.seed)
    kills = args.worker_kills if args.worker_kills is not None else (1 if args.quick else 2)
    schedule = Schedule(rng, cfg["trainer"]["total_steps"], cfg["checkpoint"]["every"], kills,
                        proxy is not None)
    try:
        watch, attempts, rc = run_job(work / "job.yaml", run_dir, work, schedule, rng, args.timeout, proxy)
    finally:
        if proxy is not None:
            proxy.close()
            kill_session(server)
    result = {"seed": args.seed, "agent": args.agent, **analyse(run_dir, work, watch),
              "driver_attempts": attempts,
              "wall_seconds": round(time.perf_counter() - t0, 1), "engine": cfg["rollout"]["engine"],
              "teacher": "serve-teacher behind a flaky proxy" if proxy else "local engine actor",
              "schedule": {"driver_sigkill_step": schedule.driver,
                           "rollout_worker_kill_steps": schedule.workers,
                           "teacher_outage_step": schedule.teacher}}
    ok = (rc == 0 and result["steps"] == result["steps_planned"] and result["samples_lost"] == 0
          and result["samples_duplicated"] == 0 and result["samples_unexpected"] == 0
          and result["faults_survived"] == result["faults_injected"])
    result["ok"] = ok
    if not ok:
        result["work_dir"] = str(work)  # kept for a look at the driver logs
    text = json.dumps(result, indent=2)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ("soak_agent.json" if args.agent else "soak.json")).write_text(text + "\n")
    if ok and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def start_teacher(cfg: dict, work: Path, seed: int, nan_rate: float):
    """``opd serve-teacher`` (its own session and embedded Ray) and the fault proxy in front of it."""
    import socket

    import requests
    from soak_faults import FlakyTeacherProxy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "opd.cli", "serve-teacher", cfg["models"]["teacher"], "--port", str(port),
           "--max-model-len", str(cfg["rollout"]["max_model_len"]),
           "--max-logprobs", str(cfg["teacher"]["max_logprobs"])]
    with open(work / "teacher-server.log", "w") as log:
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                break
        except requests.RequestException:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            kill_session(server)
            raise RuntimeError(f"opd serve-teacher did not come up; see {work / 'teacher-server.log'}")
        time.sleep(1)
    return server, FlakyTeacherProxy(f"http://127.0.0.1:{port}", seed, nan_rate,
                                     str(work / "teacher_faults.jsonl"))


def _write_heldout(work: Path) -> None:
    """The held-out prompts, which the flaky verifier leaves alone (see soak_faults)."""
    from transformers import AutoTokenizer

    from opd.config import load_config
    from opd.preflight import load_prompts

    c = load_config(work / "job.yaml")
    _, test = load_prompts(c, AutoTokenizer.from_pretrained(c.models.student))
    (work / "heldout_prompts.json").write_text(json.dumps([p.columns["prompt"] for p in test]))


if __name__ == "__main__":
    sys.exit(main())
