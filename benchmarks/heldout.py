"""One judge for every system's final checkpoint: held-out accuracy and held-out teacher KL, with plain
transformers.

    python benchmarks/heldout.py CONFIG MODEL_DIR [MODEL_DIR ...]        # JSON per model

``accuracy``: greedy ``generate`` on the config's held-out prompts (``eval.num_prompts``,
``eval.max_new_tokens``), scored by the config's first verifier. ``teacher_kl``: per held-out prompt
``eval.kl_samples`` (at least 1) samples of the model at temperature 1 (``rollout.max_new_tokens``; seeded, so
a model is always judged on the same
draws), then the mean over their tokens of ``log p_model(y_t) - log p_teacher(y_t)`` from forward passes of
both: the same estimator of per-token KL(student || teacher) that opd's own ``eval_teacher_kl`` reports,
computed here without vLLM or Ray so that opd's and TRL's students are judged by the same code.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KL_SEED = 1234


def held_out_prompts(cfg) -> list:
    from transformers import AutoTokenizer

    from opd.preflight import load_prompts

    return load_prompts(cfg, AutoTokenizer.from_pretrained(cfg.models.student))[1]


def _mask_left(prompts: list, width: int):
    import torch

    return torch.tensor([[0] * (width - len(p.token_ids)) + [1] * len(p.token_ids) for p in prompts])


def _verify(fn, prompts: list, texts: list[str]) -> list[float]:
    columns = {k: [p.columns[k] for p in prompts] for k in prompts[0].columns if k != "prompt"}
    out = fn([p.columns["prompt"] for p in prompts], texts, **columns)
    if inspect.isawaitable(out):
        out = asyncio.run(out)
    return [float(x) if isinstance(x, int | float) else 0.0 for x in out]


def judge(model_dir: str, cfg, teacher=None, batch: int = 50) -> dict:
    """``{"accuracy": ..., "teacher_kl": ...}`` of one checkpoint (``teacher_kl`` None with no
    ``models.teacher``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.rewards.registry import resolve

    tok = AutoTokenizer.from_pretrained(cfg.models.student)
    prompts = held_out_prompts(cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    verifier = resolve(cfg.verifiers.functions[0].name)
    correct, kl_sum, kl_tokens = [], 0.0, 0
    eos = tok.eos_token_id
    for i in range(0, len(prompts), batch):
        part = prompts[i : i + batch]
        width = max(len(p.token_ids) for p in part)
        ids = torch.tensor([[eos] * (width - len(p.token_ids)) + p.token_ids for p in part])
        attn = _mask_left(part, width)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False,
                                 max_new_tokens=cfg.eval.max_new_tokens,
                                 pad_token_id=eos, eos_token_id=eos)
        correct += _verify(verifier, part, tok.batch_decode(out[:, width:], skip_special_tokens=True))
        if teacher is not None:
            s, n = _sampled_kl(model, teacher, ids, attn, eos, cfg, seed=KL_SEED + i)
            kl_sum, kl_tokens = kl_sum + s, kl_tokens + n
    return {"accuracy": sum(correct) / len(prompts), "teacher_kl": kl_sum / kl_tokens if kl_tokens else None,
            "eval_prompts": len(prompts)}


def _sampled_kl(model, teacher, ids, attn, eos: int, cfg, seed: int) -> tuple[float, int]:
    """(sum, count) over the sampled response tokens of log p_model - log p_teacher; a response ends at its
    EOS."""
    import torch

    n = max(1, cfg.eval.kl_samples)
    ids, attn = ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                             temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=cfg.rollout.max_new_tokens, pad_token_id=eos, eos_token_id=eos)
        width = ids.shape[1]
        resp = out[:, width:]
        is_eos = (resp == eos).long()
        # Real tokens: up to and including the first EOS (what an engine returns as the response).
        real = (torch.cumsum(is_eos, 1) - is_eos == 0).long()
        full_attn = torch.cat([attn, real], 1)
        total = 0.0
        for m, sign in ((model, 1.0), (teacher, -1.0)):
            logits = m(input_ids=out, attention_mask=full_attn).logits[:, width - 1 : -1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
            total += sign * float((logp * real).sum())
    return total, int(real.sum())


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from opd.config import load_config

    config, *models = argv if argv is not None else sys.argv[1:]
    cfg = load_config(config)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.models.teacher, dtype=torch.float32).eval()
    for m in models:
        print(json.dumps({"model": m, **judge(m, cfg, teacher)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
