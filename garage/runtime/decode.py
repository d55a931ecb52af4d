"""The decode loop: greedy or sampled decoding through the injected step graph.

Inputs follow `model.generate`: position ids from the attention mask (left padding), and tokens chosen as
`model.generate` chooses them (`sampling.py`). The cache is allocated once, for the prompt and every new
token; the step graph writes it in place, first the whole prompt, then one token a step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .sampling import Generation

Step = Callable[..., Any]


def _nothing() -> None:
    """What runs after each step when the request asks for nothing."""


def decode_loop(prompt_step: Step, token_step: Step, kv_shapes: list[tuple[int, int]], input_ids: torch.Tensor,
                attention_mask: torch.Tensor, request: Generation, cache_dtype: torch.dtype) -> torch.Tensor:
    """Greedy or sampled decoding with a KV cache; returns prompt + new tokens, like `model.generate`.

    Both steps run the step graph: `prompt_step` on the whole prompt, `token_step` on each new token (the
    two differ only when compiled). `kv_shapes` is (kv_heads, head_dim) for each flat cache entry
    (k0, v0, k1, v1, …). Tokens are chosen by `request` (`garage.runtime.sampling`), as `model.generate`
    chooses them. `request.after_call` runs after each step (where captures are recorded)."""
    mask = attention_mask.to(torch.long)
    batch, prompt_tokens = input_ids.shape
    device = input_ids.device
    max_new_tokens = request.max_new_tokens
    processors = request.processors(mask)
    prompt_length = mask.sum(-1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    length = prompt_tokens + max_new_tokens
    cache = tuple(torch.zeros(batch, heads, length, dim, dtype=cache_dtype, device=device) for heads, dim in kv_shapes)
    full_mask = torch.cat([mask, mask.new_zeros(batch, max_new_tokens)], dim=-1)
    called = request.after_call or _nothing
    logits = prompt_step(input_ids, full_mask, positions, prompt_length, torch.arange(prompt_tokens, device=device), cache)
    called()
    tokens = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(request.eos, device=device) if request.eos else None
    pad_token_id = request.pad_token_id
    last_position = positions[:, -1:]
    for i in range(max_new_tokens):
        next_token = request.choose(processors(tokens, logits.float()))  # type: ignore[arg-type]
        if eos is not None and pad_token_id is not None:
            next_token = torch.where(unfinished, next_token, torch.full_like(next_token, pad_token_id))
        tokens = torch.cat([tokens, next_token[:, None]], dim=-1)
        if eos is not None:
            unfinished &= ~torch.isin(next_token, eos)
            if not unfinished.any():
                break
        if i == max_new_tokens - 1:
            break
        slot = prompt_tokens + i
        full_mask[:, slot] = 1
        last_position = last_position + 1
        slots = torch.full((1,), slot, dtype=torch.long, device=device)
        logits = token_step(next_token[:, None], full_mask, last_position, prompt_length, slots, cache)
        called()
    return tokens
