"""The decode loop: greedy or sampled decoding through the injected step graph.

Inputs follow `model.generate`: position ids from the attention mask (left padding), and tokens chosen as
`model.generate` chooses them (`sampling.py`). The cache is allocated once, for the prompt and every new
token; the step graph writes it in place, first the whole prompt, then one token a step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .._compat import mark_static_address
from .sampling import Generation

Step = Callable[..., Any]
LENGTH_STEP = 256  # kept buffers' lengths are rounded up to a multiple of this


class KVBuffers:
    """Where a generation's cache lives: one [batch, kv_heads, length, head_dim] buffer per k and v.

    Fresh buffers each call, or, with `keep` (for CUDA graphs, which replay reads and writes at fixed
    addresses), one set kept between calls, marked static for torch.compile and zeroed for each generation.
    Kept buffers are `LENGTH_STEP`-rounded, so that generations of nearby lengths share one recorded graph
    (the attention mask hides the slots past the prompt and its new tokens); the set is replaced when a call
    needs another batch size, rounded length, dtype or device (a longer set is not reused for a shorter call:
    every step would attend over its extra slots). They hold their memory until the model is dropped, like
    transformers' static cache."""

    def __init__(self, shapes: list[tuple[int, int]], keep: bool = False) -> None:
        """`shapes` is (kv_heads, head_dim) for each buffer (k0, v0, k1, v1, …)."""
        self.shapes, self.keep = shapes, keep
        self.kept: tuple[torch.Tensor, ...] = ()

    def __call__(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        if not self.keep:
            return self._new(batch, length, dtype, device)
        length = -(-length // LENGTH_STEP) * LENGTH_STEP
        current = self.kept[0] if self.kept else None
        if current is not None and (current.shape[0], current.shape[2], current.dtype, current.device) == (
                batch, length, dtype, device):
            for buffer in self.kept:
                buffer.zero_()
            return self.kept
        self.kept = ()  # the old set's memory goes before the new set's is taken
        self.kept = self._new(batch, length, dtype, device)
        for buffer in self.kept:
            mark_static_address(buffer)
        return self.kept

    def _new(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(batch, heads, length, dim, dtype=dtype, device=device) for heads, dim in self.shapes)


class CrossBuffers:
    """An encoder–decoder generation's inputs beside its tokens: the decoder's self-attention cache (`own`), its
    cross-attention cache ([batch, heads, source, head size] each, which the first step fills), and the
    encoder's states and mask, which every step reads."""

    def __init__(self, own: KVBuffers, cross: list[tuple[int, int]], states: torch.Tensor, mask: torch.Tensor) -> None:
        self.own, self.cross, self.states, self.mask = own, cross, states, mask

    def __call__(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        source = self.states.shape[1]
        cross = (torch.zeros(batch, heads, source, dim, dtype=dtype, device=device) for heads, dim in self.cross)
        return (*self.own(batch, length, dtype, device), *cross, self.states, self.mask)


def _nothing() -> None:
    """What runs after each step when the request asks for nothing."""


def decode_loop(prompt_step: Step, token_step: Step, buffers: KVBuffers | CrossBuffers, cache_dtype: torch.dtype,
                input_ids: torch.Tensor, attention_mask: torch.Tensor, request: Generation) -> torch.Tensor:
    """Greedy or sampled decoding with a KV cache; returns prompt + new tokens, like `model.generate`.

    Both steps run the step graph: `prompt_step` on the whole prompt, `token_step` on each new token (the
    two differ only when compiled), over the cache that `buffers` gives (in `cache_dtype`). Tokens are chosen
    by `request` (`garage.runtime.sampling`), as `model.generate` chooses them. `request.after_call` runs after
    each step (where captures are recorded)."""
    # Fresh tensors with standard strides: a view's (even one `.contiguous()` keeps, as when its batch is 1)
    # are guarded on, and a compiled step would recompile for them.
    input_ids = input_ids.clone(memory_format=torch.contiguous_format)
    mask = attention_mask.to(torch.long).clone(memory_format=torch.contiguous_format)
    batch, prompt_tokens = input_ids.shape
    device = input_ids.device
    max_new_tokens = request.max_new_tokens
    processors = request.processors(mask)
    prompt_length = mask.sum(-1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = buffers(batch, prompt_tokens + max_new_tokens, cache_dtype, device)
    length = cache[0].shape[2] if cache else prompt_tokens + max_new_tokens
    full_mask = torch.cat([mask, mask.new_zeros(batch, length - prompt_tokens)], dim=-1)
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
