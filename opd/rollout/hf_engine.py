"""HFEngine: the rollout engine protocol of ``VLLMEngine`` on plain transformers, for CPU runs and tests.

Same records (``Generation``, ``PromptScores``), same numbers: the log-prob reported for a drawn token is the
model's own (log-softmax of the raw logits, before temperature and top-p), which is what vLLM reports in its
default ``logprobs_mode="raw_logprobs"``, so the learner's importance weights mean the same thing on either
engine. The decode loop is batched (left padding, attention mask, KV cache) and vectorised over the batch; the
only per-row Python work is drawing each row's uniforms once per call and building the output records.

Sampling is inverse-CDF with one uniform per (row, step), drawn up front from a generator seeded by the
prompt's seed and the sample's index: the same seeds give the same samples whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import torch

from opd.models.head import head_logits
from opd.models.prefix import SharedPrompts, share_prompts, shared_response_hidden
from opd.rollout.align import response_slice, score_starts
from opd.rollout.engine import PromptScores
from opd.types import Generation

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
_SCORE_CHUNK_ELEMS = 1 << 26  # logits elements per scoring forward: bounds memory on large vocabularies


def _row_seed(seed: int, sample: int) -> int:
    """A 63-bit generator seed per (prompt seed, sample index); hashed so nearby seeds give unrelated
    streams."""
    digest = hashlib.blake2b(f"{seed}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _on(shared: SharedPrompts, device: torch.device) -> SharedPrompts:
    return SharedPrompts(*(getattr(shared, f.name).to(device) for f in dataclasses.fields(shared)))


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id generation stops on, as vLLM collects them: the tokenizer's EOS and generation_config's."""
    ids = set()
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if v is not None:
            ids.update(v if isinstance(v, list) else [v])
    return sorted(ids)


class HFEngine:
    def __init__(
        self,
        model_dir: str,
        *,
        seed: int = 0,
        max_model_len: int | None = 128,  # None: the model config's own limit
        dtype: str = "float32",
        # torch intra-op threads; None keeps the process's (Ray sets it per actor)
        threads: int | None = None,
        device: str | None = None,  # None: cuda when available, else cpu
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES and dtype != "auto":
            raise ValueError(f"models.dtype={dtype!r}: the hf engine takes one of {sorted(_DTYPES)} "
                             "or 'auto'")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=_DTYPES.get(dtype, "auto")
        ).to(self.device).eval()
        limit = self.model.config.max_position_embeddings
        self.max_model_len = min(max_model_len or limit, limit)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self._unseeded = torch.Generator().manual_seed(seed)  # seeds for calls that give none

    def _check_lengths(self, seqs: list[list[int]], room: int) -> None:
        """vLLM's limits: no empty sequence, and prompt + ``room`` new tokens within max_model_len."""
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"sequence {i} is empty")
            if len(s) + room > self.max_model_len:
                raise ValueError(
                    f"sequence {i} has {len(s)} tokens: with {room} new token(s) that passes "
                    f"rollout.max_model_len={self.max_model_len}"
                )

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seeds: list[int] | None = None,
    ) -> list[list[Generation]]:
        """n samples per prompt, each with the model's log-prob of its tokens (0.0 when greedy, as
        VLLMEngine)."""
        if not prompt_ids:
            return []
        self._check_lengths(prompt_ids, 1)
        greedy = temperature <= 0
        rows = [p for p in prompt_ids for _ in range(n)]
        B, P = len(rows), max(map(len, rows))
        steps = min(max_tokens, self.max_model_len - min(map(len, rows)))
        dev = self.device
        ids_BP = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((B, P + steps), dtype=torch.long)
        for b, p in enumerate(rows):
            ids_BP[b, P - len(p):] = torch.tensor(p)
            mask_BL[b, P - len(p):] = 1
        # A row stops at max_tokens or where it would pass max_model_len, as vLLM caps it.
        limit_B = torch.tensor([min(max_tokens, self.max_model_len - len(p)) for p in rows], device=dev)
        uniform_BS = None
        if not greedy:
            if seeds is None:
                seeds = torch.randint(0, 2**31, (len(prompt_ids),), generator=self._unseeded).tolist()
            elif len(seeds) != len(prompt_ids):
                raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
            uniform_BS = torch.stack([
                torch.rand(steps, generator=torch.Generator().manual_seed(_row_seed(seeds[i // n], i % n)),
                           dtype=torch.float64)
                for i in range(B)
            ]).to(dev)
        ids_BP, mask_BL = ids_BP.to(dev), mask_BL.to(dev)
        pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
        # Past the prompt every row advances one position a step, finished rows included (they feed pads).
        pos_BL[:, P:] = pos_BL[:, P - 1 : P] + torch.arange(1, steps + 1, device=dev)
        mask_BL[:, P:] = 1
        eos_E = torch.tensor(self.eos_ids, dtype=torch.long, device=dev)
        out_BS = torch.full((B, steps), self.pad_id, dtype=torch.long, device=dev)
        lp_BS = torch.zeros((B, steps), dtype=torch.float32, device=dev)
        done_B = torch.zeros(B, dtype=torch.bool, device=dev)
        stop_B = torch.zeros(B, dtype=torch.bool, device=dev)  # ended on EOS (vs length)
        len_B = torch.zeros(B, dtype=torch.long, device=dev)
        cache, inp = None, ids_BP
        for t in range(steps):
            # layout index of this step's input token (t >= 1); step 0 feeds the whole prompt
            last = P + t - 1
            out = self.model(
                input_ids=inp,
                attention_mask=mask_BL[:, :P] if t == 0 else mask_BL[:, : last + 1],
                position_ids=pos_BL[:, :P] if t == 0 else pos_BL[:, last : last + 1],
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
            cache = out.past_key_values
            logits_BV = out.logits[:, -1].float()
            tok_B = (logits_BV.argmax(-1) if greedy
                     else self._sample(logits_BV, temperature, top_p, uniform_BS[:, t]))
            tok_B = torch.where(done_B, self.pad_id, tok_B)
            out_BS[:, t] = tok_B
            if not greedy:
                lp_BS[:, t] = torch.log_softmax(logits_BV, -1).gather(-1, tok_B[:, None]).squeeze(-1)
            live_B = ~done_B
            len_B += live_B
            hit_B = live_B & torch.isin(tok_B, eos_E)
            stop_B |= hit_B
            done_B |= hit_B | (len_B >= limit_B)
            if bool(done_B.all()):
                break
            inp = tok_B[:, None]
        return self._records(out_BS.cpu(), lp_BS.cpu(), len_B.cpu(), stop_B.cpu(), len(prompt_ids), n)

    @staticmethod
    def _sample(logits_BV: torch.Tensor, temperature: float, top_p: float, u_B: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF draw from softmax(logits / T) restricted to the top-p nucleus, one uniform per row."""
        probs_BV = torch.softmax(logits_BV / temperature, -1)
        order_BV = None
        if top_p < 1.0:
            probs_BV, order_BV = probs_BV.sort(-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is <
            # top_p.
            before_BV = probs_BV.cumsum(-1) - probs_BV
            probs_BV = probs_BV.masked_fill(before_BV >= top_p, 0.0)
        cdf_BV = probs_BV.double().cumsum(-1)
        target_B1 = (u_B * cdf_BV[:, -1]).unsqueeze(-1)
        idx_B = torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(-1).clamp(max=cdf_BV.shape[-1] - 1)
        return idx_B if order_BV is None else order_BV.gather(-1, idx_B[:, None]).squeeze(-1)

    def _records(self, out_BS, lp_BS, len_B, stop_B, num_prompts: int, n: int) -> list[list[Generation]]:
        lengths, stops = len_B.tolist(), stop_B.tolist()
        ids = [row[:k] for row, k in zip(out_BS.tolist(), lengths, strict=True)]
        lps = [row[:k] for row, k in zip(lp_BS.tolist(), lengths, strict=True)]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        gens = [
            Generation(i, lp, text, "stop" if s else "length")
            for i, lp, text, s in zip(ids, lps, texts, stops, strict=True)
        ]
        return [gens[k * n : (k + 1) * n] for k in range(num_prompts)]

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], top_k: int = 0, starts: list[int] | None = None,
              hidden: bool = False) -> list[PromptScores]:
        """Log-probs of each sequence's tokens from ``starts[i]`` (default 1) on, each given its prefix,
        temperature 1 (vLLM's ``prompt_logprobs``). The LM head runs only at the positions that predict those
        tokens; with
        ``hidden`` each row also carries the final hidden states there (what a learner applies the teacher's
        head to)."""
        self._check_lengths(sequences, 0)
        starts = score_starts(sequences, starts)
        rows = [len(s) - st for s, st in zip(sequences, starts, strict=True)]
        vocab = self.model.config.vocab_size
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad less
        by_index: dict[int, PromptScores] = {}
        start = 0
        while start < len(order):
            end, logits = start + 1, rows[order[start]]
            while end < len(order) and (logits + rows[order[end]]) * vocab <= _SCORE_CHUNK_ELEMS:
                logits += rows[order[end]]
                end += 1
            idx = order[start:end]
            parts = self._score_chunk([sequences[i] for i in idx], [starts[i] for i in idx], top_k, hidden)
            by_index.update(zip(idx, parts, strict=True))
            start = end
        return [by_index[i] for i in range(len(sequences))]

    def _score_chunk(self, seqs: list[list[int]], starts: list[int], top_k: int,
                     hidden: bool) -> list[PromptScores]:
        spans = [response_slice(st, len(s) - st) for s, st in zip(seqs, starts, strict=True)]
        h_NH = self._scored_hidden(seqs, starts, spans)  # only the rows that are scored
        logp_NV = torch.log_softmax(
            head_logits(self.model.get_output_embeddings(), self.model.config, h_NH).float(), -1)
        targets_N = torch.tensor([t for s, st in zip(seqs, starts, strict=True) for t in s[st:]],
                                 device=self.device)
        tok_N = logp_NV.gather(-1, targets_N[:, None]).squeeze(-1).cpu().tolist()
        if top_k:
            top_lp, top_ids = logp_NV.topk(min(top_k, logp_NV.shape[-1]), dim=-1)
            top_lp, top_ids = top_lp.cpu().tolist(), top_ids.cpu().tolist()
        h_NH = h_NH.float().cpu().numpy() if hidden else None
        out, at = [], 0
        for sl in spans:
            k, at = sl.stop - sl.start, at + sl.stop - sl.start
            out.append(PromptScores(tok_N[at - k : at], top_ids[at - k : at] if top_k else None,
                                    top_lp[at - k : at] if top_k else None,
                                    h_NH[at - k : at] if hidden else None))
        return out

    def _scored_hidden(self, seqs: list[list[int]], starts: list[int], spans: list[slice]) -> torch.Tensor:
        """Final hidden states at the positions predicting the scored tokens, all sequences' rows one after
        another. Sequences that continue the same prompt (a group's samples) run it once
        (``opd.models.prefix``)."""
        decoder = self.model.get_decoder()
        shared = share_prompts([s[:st] for s, st in zip(seqs, starts, strict=True)],
                               [s[st:] for s, st in zip(seqs, starts, strict=True)], self.pad_id)
        if shared is not None:
            h_BTH = shared_response_hidden(decoder, _on(shared, self.device))
            return torch.cat([h_BTH[b, : sl.stop - sl.start] for b, sl in enumerate(spans)])
        # Right padding: a causal model's positions never see the pads after them, so no mask is needed.
        ids_BT = torch.full((len(seqs), max(map(len, seqs))), self.pad_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids_BT[b, : len(s)] = torch.tensor(s)
        h_BTH = decoder(input_ids=ids_BT.to(self.device), use_cache=False).last_hidden_state
        return torch.cat([h_BTH[b, sl] for b, sl in enumerate(spans)])

    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """The learner's weights as (name, tensor) pairs (``weight_sync``); every parameter must be
        covered."""
        state = dict(weights)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(
                f"weight blob does not match the rollout model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
