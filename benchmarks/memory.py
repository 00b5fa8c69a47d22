"""Learner memory on one batch: opd's learner with the LM head and loss in pieces or all at once, against
TRL's
``DistillationTrainer`` step, on the same student, teacher, batch and loss (full-vocabulary reverse KL).

    python benchmarks/memory.py --config configs/smollm2.yaml                 # the job's batch, and 4x it
    python benchmarks/memory.py --config configs/demo.yaml --scales 1

Each measurement runs in a fresh process: peak RSS growth over one training step (Linux VmHWM, reset just
before the step) and the bytes of the tensors autograd saved for the backward
(``opd.trainer.memory.ActivationMeter``, wrapped around TRL's forward and backward as around opd's). Responses
are max_new_tokens random tokens after the task's real prompts: memory depends on the lengths, not on the
words. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                  if ":" in line)
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _batch(cfg, n: int, seed: int = 0):
    from transformers import AutoTokenizer

    from opd.preflight import load_prompts

    train, _ = load_prompts(cfg, AutoTokenizer.from_pretrained(cfg.models.student))
    rng = random.Random(seed)
    prompts = [train[i % len(train)].token_ids for i in range(n)]
    vocab = AutoTokenizer.from_pretrained(cfg.models.student).vocab_size
    responses = [[rng.randrange(100, vocab - 1) for _ in range(cfg.rollout.max_new_tokens)] for _ in range(n)]
    return prompts, responses


def child(spec: dict) -> dict:
    import torch

    from opd.config import load_config
    from opd.trainer.memory import ActivationMeter

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    cfg = load_config(spec["config"], spec["overrides"])
    prompts, responses = _batch(cfg, spec["n"])
    if spec["system"].startswith("opd"):
        from opd.plan import spec_of
        from opd.trainer.learner import Learner
        from opd.types import TrainBatch

        learner = Learner(cfg.models.student, lr=1e-5, torch_threads=spec["threads"],
                          micro_batch_size=spec["n"], logits_chunk_tokens=spec["chunk"],
                          teacher_dir=cfg.models.teacher,
                          objective=spec_of("opd.divergence=full_vocab"))
        batch = TrainBatch(uids=[str(i) for i in range(spec["n"])], prompt_ids=prompts,
                           response_ids=responses,
                           sampler_logprobs=[[-3.0] * len(r) for r in responses],
                           advantages=[[0.0] * len(r) for r in responses], teacher_logprobs=None,
                           objective="opd")
        # warm-up: allocator pools and the optimizer state exist before the measured step
        learner.train_step(batch)
        rss0, _ = _rss()
        _reset_peak()
        t0 = time.perf_counter()
        stats = learner.train_step(batch)
        seconds = time.perf_counter() - t0
        saved = stats["activation_mib"] * 2**20
    else:
        trainer = _trl_trainer(cfg, spec)
        inputs = _trl_inputs(prompts, responses, trainer.processing_class.pad_token_id)
        # The same update as opd's step: an AdamW step after the backward (its temporaries count towards the
        # peak).
        optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-5)

        def step() -> int:
            with ActivationMeter() as meter:
                loss = trainer.compute_loss(trainer.model, inputs)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return meter.bytes

        step()
        rss0, _ = _rss()
        _reset_peak()
        t0 = time.perf_counter()
        saved = step()
        seconds = time.perf_counter() - t0
    _, peak = _rss()
    return {"peak_rss_growth_mib": round((peak - rss0) / 2**20, 1),
            "saved_for_backward_mib": round(saved / 2**20, 1),
            "step_seconds": round(seconds, 2)}


def _trl_trainer(cfg, spec):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    tok = AutoTokenizer.from_pretrained(cfg.models.student, padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(cfg.models.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.models.teacher, dtype=torch.float32)
    args = DistillationConfig(output_dir=spec["work"], per_device_train_batch_size=spec["n"], beta=1.0,
                              bf16=False, gradient_checkpointing=False, report_to="none",
                              save_strategy="no", use_vllm=False,
                              max_completion_length=cfg.rollout.max_new_tokens)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}]}] * spec["n"])
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                               processing_class=tok)


def _trl_inputs(prompts, responses, pad_id: int) -> dict:
    import torch

    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor(responses)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": torch.ones_like(completion_ids)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2.yaml"))
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4],
                   help="batch = scale x prompts_per_step x group_size")
    p.add_argument("--chunk", type=int, default=128,
                   help="logits_chunk_tokens of the pieces run (0 is the other)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-memory")
    p.add_argument("--out", type=Path)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(spec["result"]).write_text(json.dumps(child(spec)))
        return 0
    from opd.config import load_config

    cfg = load_config(args.config, args.overrides)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale in args.scales:
        n = scale * cfg.rollout.prompts_per_step * cfg.rollout.group_size
        for system, chunk in (("opd-pieces", args.chunk), ("opd-at-once", 0), ("trl", None)):
            spec = {"system": system, "chunk": chunk, "n": n, "threads": args.threads, "config": args.config,
                    "overrides": args.overrides, "work": str(args.work_dir / system),
                    "result": str(args.work_dir / f"{system}-{n}.json")}
            path = args.work_dir / f"{system}-{n}.spec.json"
            path.write_text(json.dumps(spec))
            proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True,
                                  text=True)
            if proc.returncode:
                raise SystemExit(f"{system} at {n} sequences failed:\n{proc.stderr[-2000:]}")
            rows.append({"system": system, "sequences": n, "logits_chunk_tokens": chunk,
                         **json.loads(Path(spec["result"]).read_text())})
            print(json.dumps(rows[-1]), flush=True)
    report = {"config": args.config, "student": cfg.models.student, "teacher": cfg.models.teacher,
              "response_tokens": cfg.rollout.max_new_tokens, "threads": args.threads, "rows": rows,
              "ratios": _ratios(rows)}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _ratios(rows: list[dict]) -> dict:
    out = {}
    for n in sorted({r["sequences"] for r in rows}):
        by = {r["system"]: r for r in rows if r["sequences"] == n}
        out[str(n)] = {f"{a}/{b}_{k}": round(by[a][k] / by[b][k], 3)
                       for a, b in (("opd-pieces", "opd-at-once"), ("opd-pieces", "trl"),
                                    ("opd-at-once", "trl"))
                       for k in ("peak_rss_growth_mib", "saved_for_backward_mib")}
    return out


if __name__ == "__main__":
    sys.exit(main())
