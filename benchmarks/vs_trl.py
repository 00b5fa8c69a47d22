"""opd's on-policy distillation against TRL's ``DistillationTrainer``: same student, teacher, prompts, batch,
steps.

    python benchmarks/vs_trl.py                       # default budget; writes benchmarks/results/vs_trl.json
    python benchmarks/vs_trl.py --quick               # a few steps of every system (smoke), JSON under
                                                      # --work-dir
    python benchmarks/vs_trl.py --steps 40 --systems opd-full_vocab trl-hf rollout.prompts_per_step=64

Systems, run one after the other in this invocation, each in its own process (no Ray, vLLM or torch state
leaks from one into the next): ``opd-full_vocab`` (the like-for-like loss: the exact full-vocabulary
divergence TRL computes, ``--kind`` reverse/forward/jsd = TRL ``beta`` 1/0/``--jsd-beta``; the teacher's
forward in the learner),
``opd-full_vocab-teacher`` (the same loss, the teacher's trunk run by the teacher actor on each chunk of
samples as it is generated, ``opd.full_vocab_source=teacher``), ``opd-teacher_topk`` (the teacher's top-k
forward KL), their
``-async`` variants (``rollout.max_staleness=1``: the next batch is generated and scored while the learner
trains; rollout engine ``--async-engine``), ``opd-full_vocab-colocated`` and ``opd-teacher_topk-colocated``
(``cluster.colocate=true``: the rollout engine inside the learner's process, weights copied in place),
``trl-vllm`` (TRL generating with vLLM, colocate mode) and
``trl-hf`` (TRL generating with transformers ``generate``). TRL is fully on-policy: the student generates
every batch.

Every system sees the prompts of opd's ``PromptSource`` in the same order: prompts_per_step x group_size
samples per step, TRL's batch being those prompts each repeated group_size times (``shuffle_dataset=False``,
gradient accumulation 1). Same AdamW, the same warm-up-then-constant learning rate, grad clip, max_new_tokens,
temperature 1. Seconds per step exclude start-up, evaluation and checkpointing (opd: ``step_seconds`` of
metrics.jsonl; TRL: a callback from ``on_step_begin`` to ``on_step_end``), median and p90 after ``--warmup``
steps; stages (generation, teacher scoring, learner) are timed too and set against their FLOP bound
(``benchmarks/flops.py``). Every final student (and the initial one and the teacher) is judged by one
function, ``benchmarks/heldout.py``: greedy held-out accuracy by the config's first verifier, and held-out
KL(student || teacher) per token. Ratios, not absolute times: the machine is shared and noisy.

    python benchmarks/vs_trl.py --config configs/smollm2.yaml --seeds 0 1 2 --steps 20 \
        --work-dir runs/vs-trl-smollm2 --out benchmarks/results/vs_trl_smollm2.json \
        --threads 2 --async-engine vllm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OPD_BASE = ("opd-full_vocab", "opd-full_vocab-teacher", "opd-teacher_topk")
COLOCATED = ("opd-full_vocab", "opd-teacher_topk")  # the ones with a -colocated variant
SYSTEMS = (*OPD_BASE, *(f"{n}-async" for n in OPD_BASE), *(f"{n}-colocated" for n in COLOCATED), "trl-vllm",
           "trl-hf")
# TRL's generalised-JSD beta for each full-vocabulary kind (jsd: --jsd-beta)
TRL_BETA = {"reverse": 1.0, "forward": 0.0}


def _cfg(args, extra: dict | None = None):
    from opd.config import load_config

    return load_config(args.config, [*args.overrides, *[f"{k}={v}" for k, v in (extra or {}).items()]])


def prompt_schedule(cfg, steps: int) -> list[list]:
    """The prompts opd's loop draws at each step (its ``PromptSource`` with the run's seed), in order."""
    from transformers import AutoTokenizer

    from opd.data import PromptSource
    from opd.preflight import load_prompts

    train, _ = load_prompts(cfg, AutoTokenizer.from_pretrained(cfg.models.student))
    source = PromptSource(train, cfg.run.seed)
    return [[p for p, _ in source.next_batch(cfg.rollout.prompts_per_step)] for _ in range(steps)]


def held_out(model_dir: str, cfg, teacher) -> dict:
    """The one judge of every checkpoint (``benchmarks/heldout.py``): accuracy and teacher KL on held-out
    prompts."""
    from heldout import judge

    return judge(model_dir, cfg, teacher)


def lr_at(step: int, lr: float, warmup: int) -> float:
    """opd's learner schedule: linear warm-up reaching ``lr`` at step ``warmup - 1``, then constant."""
    return lr * (step + 1) / warmup if warmup and step < warmup else lr


# ----------------------------------------------------------------------------------------------------
# children


def child_opd(spec: dict) -> dict:
    from opd.config import load_config
    from opd.driver import run

    cfg = load_config(spec["config"], spec["overrides"])
    summary = run(cfg, fresh=True, progress=False)
    run_dir = Path(cfg.run.output_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    n = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    stages = {"generate": "generate_seconds", "score": "score_seconds", "train": "train_seconds"}
    timed = {k: [r[m] for r in rows[1:] if m in r] for k, m in stages.items()}
    # the rest of a step: the weight sync and its probe, verification, the driver's Ray calls
    timed["other"] = [r["step_seconds"] - sum(r.get(m, 0.0) for m in stages.values()) for r in rows[1:]]
    return {"step_seconds": [r["step_seconds"] for r in rows],
            "response_tokens": [r["response_length"] * n for r in rows],
            "stage_seconds": timed,
            "model_dir": str(ckpt / "model"), "own_eval_accuracy_after": summary["student_accuracy_after"],
            "own_eval_teacher_kl_after": summary.get("teacher_kl_after")}


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    torch.set_num_threads(spec["torch_threads"])
    # vLLM reads the variable as an integer number of GiB.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(spec["kv_cache_gib"]))))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.tokens, self.generate, self._t0 = [], [], [], 0.0

        def on_step_begin(self, *_, **__):
            self._t0 = time.perf_counter()
            self.generate.append(0.0)

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self._t0)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                self.tokens.append(float(logs["completions/mean_length"]) * spec["batch"])

    tok = AutoTokenizer.from_pretrained(spec["student"], padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    # opd's optimiser and schedule exactly (HF's constant_with_warmup starts at lr 0, one step behind opd's).
    opt = torch.optim.AdamW(student.parameters(), lr=spec["lr"], betas=tuple(spec["betas"]),
                            weight_decay=spec["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, spec["warmup"]))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": text}]} for text in spec["prompts"]])
    args = DistillationConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0,
        top_k=0,
        beta=spec["beta"], learning_rate=spec["lr"], max_grad_norm=spec["grad_clip"], seed=spec["seed"],
        shuffle_dataset=False, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=spec["use_vllm"], vllm_mode="colocate", vllm_max_model_length=spec["max_model_len"],
    )
    timer = StepTimer()
    initial = student.get_input_embeddings().weight.detach().float().clone()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  processing_class=tok, callbacks=[timer], optimizers=(opt, sched))
    generate = trainer._generate

    def timed_generate(*a, **kw):  # TRL generates inside the step: time it apart from the learner's part
        t0 = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            timer.generate[-1] += time.perf_counter() - t0

    trainer._generate = timed_generate
    out = trainer.train()
    final = Path(spec["run_dir"]) / "final"
    trainer.save_model(str(final))
    stages = {"generate": timer.generate[1:],
              "train": [s - g for s, g in zip(timer.seconds[1:], timer.generate[1:], strict=True)]}
    result = {"step_seconds": timer.seconds, "response_tokens": timer.tokens, "model_dir": str(final),
              "stage_seconds": stages, "train_runtime_s": out.metrics.get("train_runtime"),
              "final_lr": sched.get_last_lr()[0]}
    if spec["use_vllm"]:
        result["vllm_weight_sync"] = _vllm_sync_check(trainer, initial)
    return result


def _vllm_sync_check(trainer, initial_embedding) -> dict:
    """After one more sync, the largest |difference| between the student's embedding and the vLLM engine's
    (rows past the vocabulary are vLLM's padding), next to how far training moved it: the colocated engine
    generated from the trained weights, not the initial checkpoint."""
    gen = trainer.vllm_generation
    gen.sync_weights()
    engine = dict(gen.llm.llm_engine.model_executor.driver_worker.model_runner.model.named_parameters())
    mine = trainer.model.get_input_embeddings().weight.detach().float()
    theirs = engine["model.embed_tokens.weight"].detach()
    dtype = str(theirs.dtype).removeprefix("torch.")
    theirs = theirs.float()[: mine.shape[0]]
    return {"engine_dtype": dtype, "vllm_vs_student_max_diff": float((theirs - mine).abs().max()),
            "trained_vs_initial_max_diff": float((mine - initial_embedding).abs().max())}


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = child_opd(spec) if spec["system"].startswith("opd") else child_trl(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------- parent


def spawn(name: str, spec: dict, work: Path) -> tuple[dict | None, str | None]:
    """Run one system in a child process; (result, None) or (None, the error's last lines)."""
    spec = {**spec, "system": name, "result": str(work / f"{name}.result.json")}
    path = work / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    log = work / f"{name}.log"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, __file__, "--child", str(path)], stdout=f,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        errors = [x for x in lines if "Error" in x or "error:" in x]
        return None, (f"exit {proc.returncode}; {(errors or lines or ['no output'])[-1][:400]} "
                      f"(full log: {log})")
    return json.loads(Path(spec["result"]).read_text()), None


def timing(result: dict, warmup: int) -> dict:
    secs = result["step_seconds"][warmup:] or result["step_seconds"]
    toks = result["response_tokens"][warmup:] or result["response_tokens"]
    q = statistics.quantiles(secs, n=10)[-1] if len(secs) >= 2 else secs[0]
    return {"s_per_step_median": round(statistics.median(secs), 4), "s_per_step_p90": round(q, 4),
            "response_tokens_per_s": round(sum(toks) / sum(secs), 1) if toks else None,
            "steps_timed": len(secs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--quick", action="store_true",
                   help="4 steps of 32 prompts, 100 held-out prompts: a smoke run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--kind", choices=["reverse", "forward", "jsd"], default="reverse",
                   help="full-vocabulary divergence")
    p.add_argument("--jsd-beta", type=float, default=0.5)
    p.add_argument("--async-engine", choices=["vllm", "hf"], default="hf",
                   help="rollout.engine of the -async systems (hf: faster on the tiny demo models)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of opd's learner (trainer.torch_threads) "
                        "and of TRL's process")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-vs-trl")
    p.add_argument("--out", type=Path,
                   help="JSON report (default: benchmarks/results/vs_trl.json; --quick: WORK/vs_trl.json)")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="run the comparison once per run.seed (reports in WORK/seed_S.json) "
                        "and pair the accuracies")
    p.add_argument("--pair", type=Path, nargs="+", metavar="REPORT",
                   help="only pair the accuracies of reports written earlier (one per seed); no runs")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) applied to every system")
    args = p.parse_args()
    if args.child:
        return child_main(args.child)
    if args.seeds or args.pair:
        return seeds_main(args)
    if args.quick:
        args.steps, args.warmup = min(args.steps, 4), 1
        args.overrides = ["rollout.prompts_per_step=32", "eval.num_prompts=100", "trainer.warmup_steps=2",
                          *args.overrides]
    out = args.out or (args.work_dir / "vs_trl.json" if args.quick
                       else ROOT / "benchmarks" / "results" / "vs_trl.json")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report = compare(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def opd_systems(args) -> dict[str, dict]:
    """Each opd system's config overrides."""
    full = {"opd.divergence": "full_vocab", "opd.full_vocab_kind": args.kind, "opd.jsd_beta": args.jsd_beta,
            "teacher.top_k": 0}
    runs = {
        "opd-full_vocab": full,  # the teacher's forward in the learner (no teacher actor scores samples)
        "opd-full_vocab-teacher": {**full, "opd.full_vocab_source": "teacher"},
        "opd-teacher_topk": {"opd.divergence": "teacher_topk"},
    }
    # The next batch generated (and teacher-scored) while the learner trains; samples one weight version old,
    # corrected by the truncated importance weights. The stages now run at once, so they split the cores: one
    # thread each for the rollout engine, the teacher and the learner (more threads than cores stall OpenMP's
    # barriers).
    for name in OPD_BASE:
        runs[f"{name}-async"] = {**runs[name], "rollout.max_staleness": 1,
                                 "rollout.engine": args.async_engine,
                                 "rollout.num_cpus": 1, "teacher.num_cpus": 1, "trainer.torch_threads": 1}
    # The rollout engine inside the learner's process: no actor hop, no object store, weights copied in place.
    for name in COLOCATED:
        runs[f"{name}-colocated"] = {**runs[name], "cluster.colocate": True}
    return runs


def stage_plan(name: str, args) -> dict:
    """How a system ran its stages (threads, where the teacher ran, shared prompts), read from the config the
    opd child wrote into its run directory; TRL runs everything in one process on ``--threads`` threads."""
    if name.startswith("trl"):
        return {"threads": {"generate": args.threads, "train": args.threads}, "learner_teacher": True,
                "share": False}
    from opd.config import load_config

    cfg = load_config(args.work_dir / name / "config.yaml")
    return {"threads": {"generate": cfg.rollout.num_cpus, "score": cfg.teacher.num_cpus,
                        "train": cfg.trainer.torch_threads},
            "learner_teacher": cfg.teacher_signal.learner_runs_teacher, "share": cfg.trainer.share_prompts,
            "teacher_share": cfg.teacher_engine == "hf", "score_all": cfg.teacher_engine == "vllm"}


def ensure_models(cfg) -> None:
    from opd.tasks.bootstrap import bootstrap, demo_spec

    if Path(cfg.models.student).resolve().parent == (ROOT / "models" / "demo").resolve():
        bootstrap(Path(cfg.models.student).parent, demo_spec())
    for d in (cfg.models.student, cfg.models.teacher):
        if not (Path(d) / "config.json").is_file():
            raise SystemExit(f"{d} is not a checkpoint: build it first "
                             "(make smollm2 builds the SmolLM2 pair)")


def compare(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _cfg(args)
    ensure_models(cfg)
    r, t = cfg.rollout, cfg.trainer
    schedule = prompt_schedule(cfg, args.steps)
    tok = AutoTokenizer.from_pretrained(cfg.models.student)
    # TRL renders the conversational prompt itself: check it yields opd's prompt ids, or the runs would
    # differ.
    for prompt in schedule[0][:8]:
        ids = tok.apply_chat_template([[{"role": "user", "content": prompt.columns["prompt"]}]],
                                      add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"][0]
        if list(ids) != list(prompt.token_ids):
            raise RuntimeError(f"TRL's rendering of {prompt.columns['prompt']!r} differs from opd's: "
                               f"{ids} vs {prompt.token_ids}")
    beta = args.jsd_beta if args.kind == "jsd" else TRL_BETA[args.kind]
    base = {"config": args.config, "steps": args.steps}
    common = {"trainer.torch_threads": args.threads, "run.seed": cfg.run.seed,
              "trainer.total_steps": args.steps,
              "eval.every": 0, "checkpoint.every": 0, "checkpoint.keep": 1, "rollout.max_staleness": 0}
    opd_runs = opd_systems(args)
    trl_spec = {
        "student": cfg.models.student, "teacher": cfg.models.teacher, "steps": args.steps,
        "seed": cfg.run.seed,
        "batch": r.prompts_per_step * r.group_size, "max_new_tokens": r.max_new_tokens,
        "max_model_len": r.max_model_len,
        "kv_cache_gib": r.kv_cache_gib, "lr": t.lr, "warmup": t.warmup_steps, "betas": list(t.betas),
        "weight_decay": t.weight_decay, "grad_clip": t.grad_clip, "torch_threads": args.threads, "beta": beta,
        "prompts": [p.columns["prompt"] for step in schedule for p in step for _ in range(r.group_size)],
    }
    teacher = AutoModelForCausalLM.from_pretrained(cfg.models.teacher, dtype=torch.float32).eval()
    results, notes = {}, []
    for name in args.systems:
        run_dir = args.work_dir / name
        if name in opd_runs:
            extra = {**common, **opd_runs[name], "run.name": f"vs-trl-{name}", "run.output_dir": str(run_dir)}
            spec = {**base, "overrides": [*args.overrides, *[f"{k}={v}" for k, v in extra.items()]]}
        else:
            spec = {**trl_spec, "run_dir": str(run_dir), "use_vllm": name == "trl-vllm"}
        t0 = time.perf_counter()
        res, err = spawn(name, spec, args.work_dir)
        wall = round(time.perf_counter() - t0, 1)
        print(json.dumps({"system": name, "wall_s": wall, "ok": err is None}), flush=True)
        if err:
            notes.append(f"{name} could not run here: {err}")
            results[name] = {"error": err, "wall_s": wall}
            continue
        judged = held_out(res["model_dir"], cfg, teacher)
        results[name] = {**timing(res, args.warmup), "wall_s_incl_startup": wall,
                         "accuracy_after": judged["accuracy"],
                         "teacher_kl_after": judged["teacher_kl"],
                         **{k: v for k, v in res.items() if k not in ("step_seconds", "response_tokens")},
                         "step_seconds": [round(x, 4) for x in res["step_seconds"]],
                         "response_tokens": res["response_tokens"]}
    return assemble(args, cfg, results, notes, beta, teacher, schedule)


def assemble(args, cfg, results: dict, notes: list[str], beta: float, teacher, schedule) -> dict:
    from flops import Shape, matmul_rate
    from transformers import AutoConfig
    from vs_trl_report import ratios, stage_bounds, targets

    r, t = cfg.rollout, cfg.trainer
    ok = {k: v for k, v in results.items() if "error" not in v}
    student_shape, teacher_shape = (Shape.of(AutoConfig.from_pretrained(cfg.models.student)),
                                    Shape.of(teacher.config))
    rates = {n: round(matmul_rate(n), 1) for n in sorted({1, 2, args.threads})}
    prompt_len = statistics.mean(len(p.token_ids) for step in schedule for p in step)
    for name, res in ok.items():
        res["stages"] = stage_bounds(name, res, student_shape, teacher_shape, prompt_len, r.group_size,
                                     r.prompts_per_step, rates, stage_plan(name, args))
        res.pop("response_tokens", None)
    before = held_out(cfg.models.student, cfg, teacher)
    notes += [
        "Shared 2-core machine: absolute seconds are noisy; compare the ratios measured within one run.",
        "Same prompts in the same order and the same number of samples per step, but not the same samples: "
        "each system draws its own tokens (opd from its rollout actor, TRL from vLLM in-process or HF "
        "generate).",
        "opd's step also verifies every sample (rewards are logged) and checks every weight sync with a "
        "log-prob probe; TRL does neither.",
        "opd-teacher_topk has no TRL counterpart (TRL's DistillationTrainer computes the full-vocabulary "
        "divergence only).",
        f"Learner threads: --threads {args.threads} (trainer.torch_threads, and TRL's whole process); "
        "opd's engines and teacher actors run 1 thread each (one Ray CPU).",
        "TRL: gradient_checkpointing=False and bf16=False (its defaults are True), fp32 like opd; the AdamW "
        "and the warm-up-then-constant schedule are opd's, passed in as TRL's optimizers.",
        "Stage bounds: matrix-product FLOPs (benchmarks/flops.py) / this machine's measured float32 matmul "
        "rate at the stage's thread count; generation counts a prefill per sample.",
    ]
    return {
        "settings": {
            "steps": args.steps, "timed_after_warmup_steps": args.warmup,
            "prompts_per_step": r.prompts_per_step,
            "group_size": r.group_size, "batch_sequences": r.prompts_per_step * r.group_size,
            "max_new_tokens": r.max_new_tokens, "mean_prompt_tokens": round(prompt_len, 1),
            "temperature": 1.0,
            "lr": t.lr, "warmup_steps": t.warmup_steps, "grad_clip": t.grad_clip,
            "torch_threads": args.threads,
            "divergence": args.kind, "trl_beta": beta, "eval_prompts": cfg.eval.num_prompts,
            "eval": "benchmarks/heldout.py: greedy accuracy by the first verifier; sampled teacher KL",
            "student": cfg.models.student, "teacher": cfg.models.teacher, "config": str(args.config),
            "overrides": args.overrides, "machine_cores": os.cpu_count(), "seed": cfg.run.seed,
            "matmul_gflop_per_s": rates, "async_engine": args.async_engine,
        },
        "teacher_accuracy": held_out(cfg.models.teacher, cfg, None)["accuracy"],
        "student_accuracy_before": before["accuracy"],
        "student_teacher_kl_before": before["teacher_kl"],
        "systems": results,
        "ratios_trl_over_opd_s_per_step": ratios(ok),
        "targets": targets(ok),
        "notes": notes,
    }


def seeds_main(args) -> int:
    """Accuracy after the same steps differs by several points between seeds of one system, so one seed cannot
    tell two systems apart: run (or read) one report per seed and compare the systems seed by seed."""
    reports = []
    if args.pair:
        reports = [json.loads(path.read_text()) for path in args.pair]
    else:
        base = list(args.overrides)
        for seed in args.seeds:
            args.overrides = [*base, f"run.seed={seed}"]
            work = args.work_dir / f"seed_{seed}"
            work.mkdir(parents=True, exist_ok=True)
            report = compare(argparse.Namespace(**{**vars(args), "work_dir": work}))
            (args.work_dir / f"seed_{seed}.json").write_text(json.dumps(report, indent=2) + "\n")
            reports.append(report)
    out = args.out or args.work_dir / "vs_trl_seeds.json"
    from vs_trl_report import pair_seeds

    summary = pair_seeds(reports)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
