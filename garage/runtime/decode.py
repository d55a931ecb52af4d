"""The decode loop: greedy or sampled decoding through the injected step graph.

Inputs follow `model.generate`: position ids from the attention mask (left padding), and greedy or sampled
tokens chosen as HF's logits processors do (temperature, then top-k, then top-p). The cache is allocated
once, for the prompt and every new token; the step graph writes it in place, first the whole prompt, then
one token a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

Step = Callable[..., Any]


@dataclass
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row: argmax, or a sample after temperature, top-k and top-p."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits.float() / max(self.temperature, 1e-6)
        if self.top_k:
            kth = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ordered, order = scores.sort(dim=-1)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[..., -1] = False
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(scores.softmax(-1), 1).squeeze(-1)


def decode_loop(prompt_step: Step, token_step: Step, kv_shapes: list[tuple[int, int]], input_ids: torch.Tensor,
                attention_mask: torch.Tensor, max_new_tokens: int, sampling: Sampling, eos_token_ids: list[int],
                pad_token_id: int | None, cache_dtype: torch.dtype,
                processors: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Greedy or sampled decoding with a KV cache; returns prompt + new tokens, like `model.generate`.

    Both steps run the step graph: `prompt_step` on the whole prompt, `token_step` on each new token (the
    two differ only when compiled). `kv_shapes` is (kv_heads, head_dim) for each flat cache entry
    (k0, v0, k1, v1, …). `processors` (tokens so far, scores) → scores are those of the generation config."""
    mask = attention_mask.to(torch.long)
    batch, prompt_tokens = input_ids.shape
    device = input_ids.device
    prompt_length = mask.sum(-1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    length = prompt_tokens + max_new_tokens
    cache = tuple(torch.zeros(batch, heads, length, dim, dtype=cache_dtype, device=device) for heads, dim in kv_shapes)
    full_mask = torch.cat([mask, mask.new_zeros(batch, max_new_tokens)], dim=-1)
    logits = prompt_step(input_ids, full_mask, positions, prompt_length, torch.arange(prompt_tokens, device=device), cache)
    tokens = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_token_ids, device=device) if eos_token_ids else None
    last_position = positions[:, -1:]
    for i in range(max_new_tokens):
        next_token = sampling.choose(processors(tokens, logits.float()) if processors else logits)
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
    return tokens
