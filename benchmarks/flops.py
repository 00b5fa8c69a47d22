"""FLOPs of each stage of an on-policy distillation step, and this machine's float32 matmul rate: the bound
every stage's measured time is set against (``benchmarks/vs_trl.py`` reports time / bound per stage).

    python benchmarks/flops.py models/smollm2-L20 models/smollm2
    # the bound of one step of configs/smollm2.yaml

Counts are of matrix products only (the layers' weights, attention scores and values, the LM head), 2 FLOPs
per multiply-add; a backward pass costs twice its forward. Norms, activations, softmax and the optimiser are
left out: they are memory-bound and small next to the products at these sizes.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shape:
        c = config
        return cls(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                   getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                   c.intermediate_size, c.vocab_size)

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.heads * self.head_dim * 2 + 2 * self.hidden * self.kv_heads * self.head_dim
        return attn + 3 * self.hidden * self.intermediate  # gated MLP: gate, up, down

    def forward(self, tokens: int, context: int, logits: int) -> float:
        """``tokens`` positions through every layer, ``context`` (query, key) pairs attended in all, the LM
        head at
        ``logits`` positions."""
        return (2 * self.layers * self.layer_params * tokens
                + 4 * self.layers * self.heads * self.head_dim * context
                + 2 * self.hidden * self.vocab * logits)


def causal_pairs(n: int, start: int = 0) -> int:
    """(query, key) pairs of positions start..n-1 attending causally to everything before them."""
    return n * (n + 1) // 2 - start * (start + 1) // 2


def score(shape: Shape, prompt_lens: list[int], response_lens: list[int], logits_all: bool,
          group: int = 1) -> float:
    """A forward over prompt + response; the LM head at the response positions (or at every position, as
    vLLM's
    ``prompt_logprobs`` does). ``group`` > 1: each run of ``group`` sequences shares one prompt, which runs
    once (``opd.models.prefix``), and only the responses run per sequence."""
    if group == 1:
        return sum(shape.forward(p + r, causal_pairs(p + r), (p + r) if logits_all else r)
                   for p, r in zip(prompt_lens, response_lens, strict=True))
    prompts = sum(shape.forward(p, causal_pairs(p), 0) for p in prompt_lens[::group])
    return prompts + sum(shape.forward(r - 1, causal_pairs(p + r - 1, p), r)
                         for p, r in zip(prompt_lens, response_lens, strict=True))


def train(shape: Shape, prompt_lens: list[int], response_lens: list[int], group: int = 1) -> float:
    """Forward and backward of the student with logits at the response positions only."""
    return 3 * score(shape, prompt_lens, response_lens, logits_all=False, group=group)


def generate(shape: Shape, prompt_lens: list[int], response_lens: list[int]) -> float:
    """Prefill (logits at the last prompt position) and one decode step per response token, with a KV
    cache."""
    total = 0.0
    for p, r in zip(prompt_lens, response_lens, strict=True):
        total += shape.forward(p, causal_pairs(p), 1)
        total += shape.forward(max(r - 1, 0), causal_pairs(p + r - 1, p), max(r - 1, 0))
    return total


def matmul_rate(threads: int, m: int = 1024, k: int = 576, n: int = 1536, seconds: float = 1.0) -> float:
    """Sustained float32 GFLOP/s of ``[m, k] @ [k, n]`` on ``threads`` torch threads (a layer-shaped
    product)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(prev)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoConfig

    student, teacher = (argv if argv is not None else sys.argv[1:])[:2]
    s, t = Shape.of(AutoConfig.from_pretrained(student)), Shape.of(AutoConfig.from_pretrained(teacher))
    prompts, responses = [40] * 16, [16] * 16
    print(json.dumps({
        "batch": "16 sequences, 40 prompt + 16 response tokens",
        "gflop": {"generate": generate(s, prompts, responses) / 1e9,
                  "teacher_forward": score(t, prompts, responses, False) / 1e9,
                  "student_train": train(s, prompts, responses) / 1e9},
        "matmul_gflop_per_s": {"1_thread": matmul_rate(1), "2_threads": matmul_rate(2)},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
