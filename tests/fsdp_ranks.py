"""FSDP2 learner ranks against one unsharded learner, in processes of their own (driven by
tests/test_fsdp.py).

Two processes join a gloo group on 127.0.0.1 and shard the same Learner (``join_group(..., "fsdp2")``); each
trains its token-balanced shard of every batch (``Learner.shards``, as rank 0's ``train_step`` splits it)
while the
parent trained the whole batch on one unsharded Learner. Rank 0 writes what the test compares to
OUT_DIR/result.json: per step the losses and gradient norms, the gathered weights' largest difference from the
unsharded ones, a checkpoint's resume (bit for bit) and the unsharded learner's resume from the sharded
checkpoint. No Ray: the ranks are driven here as rank 0 drives its peers in a job.

    python tests/fsdp_ranks.py MODELS_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from opd.plan import spec_of
from opd.rollout.weight_sync import whole
from opd.trainer.dist import free_port
from opd.trainer.learner import Learner
from opd.trainer.lora import LoraSpec
from opd.trainer.objectives.spec import ObjectiveSpec
from opd.types import TrainBatch

# One per objective family, and LoRA. Sizes: 9 and 8 samples at 2 per micro-batch, so the ranks' plans differ
# in length (5 / 4 samples -> 3 / 2 micro-batches: the shorter one pads), then a 1-sample step (rank 1's shard
# is empty).
CASES = {
    "opd": {"objective": ObjectiveSpec("opd")},
    "opd-full-vocab": {"objective": spec_of("opd.divergence=full_vocab"), "teacher": True},
    "opd-tip": {"objective": spec_of("selection.mode=entropy", "selection.keep_ratio=0.5")},
    "exopd": {"objective": ObjectiveSpec("exopd")},
    "grpo": {"objective": ObjectiveSpec("grpo")},
    "srpo": {"objective": spec_of("algorithm=srpo", "sdpo.top_k=8")},
    "opd-lora": {"objective": ObjectiveSpec("opd"), "lora": LoraSpec(r=4)},
    # layers re-gathered in backward
    "grpo-checkpointing": {"objective": ObjectiveSpec("grpo"), "checkpointing": True},
}
SIZES = (9, 8, 1)


def learner(models: Path, case: dict) -> Learner:
    return Learner(str(models / "student"), lr=1e-3, micro_batch_size=2, seed=0, objective=case["objective"],
                   share_prompts=True, teacher_dir=str(models / "teacher"), lora=case.get("lora"),
                   device="cpu", gradient_checkpointing=case.get("checkpointing", False))


def make_batch(probe: Learner, name: str, n: int, seed: int) -> TrainBatch:
    """Mixed lengths, a noisy teacher, per-sample weights (one at 0); for SRPO routes and self-teacher
    prompts."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(6, 90) for _ in range(rng.randint(3, 9))] for _ in range(n)]
    # Pairs of samples share a prompt here and there (as a group's samples do), so some micro-batches could
    # share their prompt's forward and others not: every rank must still run the same number of layer
    # forwards. Not for TIP: two samples of one prompt tie in entropy at their first token, and a tie is
    # broken by token order, which sharding changes (the ranks' tokens are ranked in rank order).
    if name != "opd-tip":
        prompts = [prompts[i - 1] if i % 4 == 1 else p for i, p in enumerate(prompts)]
    responses = [[rng.randrange(6, 90) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    sampler = [probe.probe_logprobs(p + r)[len(p) - 1 :] for p, r in zip(prompts, responses, strict=True)]
    teacher = [[x - rng.uniform(-1, 1) for x in s] for s in sampler]
    adv = [[-(s - t) for s, t in zip(srow, trow, strict=True)]
           for srow, trow in zip(sampler, teacher, strict=True)]
    if case_objective(name) in ("grpo", "srpo"):
        adv = [[(-1) ** i * 0.7] * len(r) for i, r in enumerate(responses)]
    sd = case_objective(name) == "srpo"
    return TrainBatch(
        uids=[f"s{seed}u{i}" for i in range(n)], prompt_ids=prompts, response_ids=responses,
        sampler_logprobs=sampler,
        advantages=adv, teacher_logprobs=teacher, objective=case_objective(name),
        loss_weights=[(1.0, 0.5, 2.0, 0.0)[i % 4] for i in range(n)] if n > 1 else None,
        teacher_prompt_ids=([(p + [30, 31, 32] if i % 3 else None) for i, p in enumerate(prompts)]
                            if sd else None),
        routes=[("sdpo" if i % 3 else "grpo") for i in range(n)] if sd else None,
    )


def case_objective(name: str) -> str:
    return CASES[name]["objective"].name


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors (gathered from every rank when sharded): every rank calls this."""
    return {k: whole(v).detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def rank_main(rank: int, models: Path, out: Path, port: int) -> None:
    torch.set_num_threads(1)
    data = torch.load(out / "data.pt", weights_only=False)
    result = {}
    for name, case in CASES.items():
        ranked = learner(models, case)
        ranked.join_group(rank, 2, "127.0.0.1", port, "gloo", "fsdp2")  # the group once; later cases reuse it
        steps = []
        for batch in data[name]["batches"]:
            parts, _ = ranked.shards(batch, 2)
            stats = ranked.train_shard(*parts[rank])
            steps.append({k: stats[k]
                          for k in ("loss", "grad_norm", "entropy", "train_tokens", "update_skipped")})
        w = weights(ranked.model)
        ckpt = out / f"ckpt-{name}"
        ranked.save(str(ckpt))  # every rank gathers, rank 0 writes
        third = data[name]["third"]
        parts, _ = ranked.shards(third, 2)
        ranked.train_shard(*parts[rank])
        w3 = weights(ranked.model)
        ranked.load(str(ckpt))  # back to step 2, and the same step again
        ranked.train_shard(*parts[rank])
        w3_again = weights(ranked.model)
        if rank == 0:
            single = data[name]
            result[name] = {
                "steps": steps, "single_steps": single["steps"],
                "max_abs_diff": max_diff(w, single["weights"]),
                "sharded": sum(1 for p in ranked.model.parameters() if type(p).__name__ == "DTensor"),
                "local_numel": sum(p.to_local().numel() for p in ranked.model.parameters()),
                "numel": sum(p.numel() for p in ranked.model.parameters()),
                "resume_bit_identical": all(torch.equal(w3[k], w3_again[k]) for k in w3),
                "third_step": w3,
            }
    if rank == 0:
        torch.save(result, out / "ranked.pt")


def main() -> None:
    models, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    data = {}
    for name, case in CASES.items():
        single = learner(models, case)
        probe = learner(models, case)
        batches = [make_batch(probe, name, n, seed) for seed, n in enumerate(SIZES)]
        third = make_batch(probe, name, 8, 7)
        steps = []
        for b in batches:
            s = single.train_step(b)
            steps.append({k: s[k]
                          for k in ("loss", "grad_norm", "entropy", "train_tokens", "update_skipped")})
        data[name] = {"batches": batches, "third": third, "steps": steps, "weights": weights(single.model)}
    torch.save(data, out / "data.pt")
    port = free_port()
    mp.spawn(_entry, args=(models, out, port), nprocs=2, join=True)
    ranked = torch.load(out / "ranked.pt", weights_only=False)
    result = {}
    for name, case in CASES.items():
        r = ranked[name]
        single = learner(models, case)  # the unsharded learner resumes the sharded checkpoint
        single.load(str(out / f"ckpt-{name}"))
        single.train_step(data[name]["third"])
        r["cross_resume_max_abs_diff"] = max_diff(weights(single.model), r.pop("third_step"))
        result[name] = r
    (out / "result.json").write_text(json.dumps(result, indent=1))


def _entry(rank: int, models: Path, out: Path, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rank_main(rank, models, out, port)


if __name__ == "__main__":
    main()
