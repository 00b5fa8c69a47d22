"""A forward over sequences that share prompts: each distinct prompt runs once and every response that follows
it (a group's G samples) reads its keys and values from one cache, so only the response tokens run per
sequence.

With chat templates the prompt is most of a sequence (SmolLM2's system turn alone is ~30 tokens): for G = 2
samples of 50-token prompts and 16-token answers the trunk runs 82 positions per prompt instead of 132. The
hidden states equal those of one forward per sequence to float rounding, and gradients flow through the shared
prompt pass into the weights as they would through each copy (tested against the plain forward,
``tests/test_learner.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class SharedPrompts:
    """A micro-batch laid out as distinct prompts (left-padded, so each ends at the last column) and the
    responses that follow them (right-padded, each one's last token dropped: no output of it is ever read)."""

    prompt_ids_PL: torch.Tensor
    prompt_mask_PL: torch.Tensor
    prompt_pos_PL: torch.Tensor
    index_B: torch.Tensor  # [B] the prompt each sequence continues
    response_in_BT: torch.Tensor  # [B, T - 1] response tokens fed as inputs
    attention_BL: torch.Tensor  # [B, Lp + T - 1] the prompt's mask, then the response inputs'
    response_pos_BT: torch.Tensor  # [B, T - 1] absolute positions of the response inputs

    def to(self, device: torch.device) -> SharedPrompts:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def share_prompts(prompt_ids: list[list[int]], response_ids: list[list[int]],
                  pad_id: int) -> SharedPrompts | None:
    """The shared layout, or None when no two sequences share a prompt (the plain forward is as cheap then) or
    a response is empty (nothing follows its prompt)."""
    distinct: dict[tuple[int, ...], int] = {}
    index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
    if len(distinct) == len(prompt_ids) or not all(response_ids):
        return None
    prompts = list(distinct)
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t_in = max(max(map(len, response_ids)) - 1, 0)
    resp = torch.full((len(response_ids), t_in), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((len(response_ids), t_in), dtype=torch.long)
    for b, r in enumerate(response_ids):
        resp[b, : len(r) - 1] = torch.tensor(r[:-1], dtype=torch.long)
        resp_mask[b, : len(r) - 1] = 1
    index_B = torch.tensor(index)
    prompt_len_B = torch.tensor([len(prompts[i]) for i in index])
    return SharedPrompts(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), index_B, resp,
                         torch.cat([mask[index_B], resp_mask], 1),
                         prompt_len_B.unsqueeze(1) + torch.arange(t_in))


def shared_response_hidden(decoder, sp: SharedPrompts) -> torch.Tensor:
    """Final hidden states at the position predicting each response token, [B, T, H]: the prompt pass's last
    position for token 0, the response pass's positions for tokens 1.. (``decoder``: the model's decoder
    stack)."""
    out = decoder(input_ids=sp.prompt_ids_PL, attention_mask=sp.prompt_mask_PL, position_ids=sp.prompt_pos_PL,
                  use_cache=True)
    first_B1H = out.last_hidden_state[:, -1][sp.index_B].unsqueeze(1)
    if sp.response_in_BT.shape[1] == 0:
        return first_B1H
    cache = out.past_key_values
    cache.batch_select_indices(sp.index_B)  # each sequence reads its own prompt's keys and values
    rest = decoder(input_ids=sp.response_in_BT, attention_mask=sp.attention_BL,
                   position_ids=sp.response_pos_BT, past_key_values=cache, use_cache=True).last_hidden_state
    return torch.cat([first_B1H, rest], 1)
