"""KV-cache decoding through injected graphs: a prefill graph and a decode graph, exported once per model.

Each graph wraps the model in a step that takes the cache as flat k/v tensors and returns the new ones,
so the cache crosses the graph boundary as plain tensors. Every layer keeps its full cache; a sliding
window is enforced by the model's own mask, which gives the same attention as a cropped cache.
Inputs follow `model.generate`: position ids from the attention mask (left padding), and greedy or
sampled tokens chosen as HF's logits processors do (temperature, then top-k, then top-p).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

EXAMPLE_PAST = 5


def _cache_kwarg(model: nn.Module) -> str:
    """`cache` in recent transformers 5, `past_key_values` before it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class CachedStep(nn.Module):
    """One forward step with the KV cache as flat tensors: (ids, mask, positions, prompt_length, *kv) → (logits, *kv)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cache_kwarg = _cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, prompt_length, past: tuple[torch.Tensor, ...] = ()):
        cache = DynamicCache(list(zip(past[0::2], past[1::2]))) if past else DynamicCache()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_kwarg: cache})
        new_cache = getattr(out, self.cache_kwarg, None) or out.past_key_values
        # contiguous, so the cache has the same strides after prefill and after decode (no recompiles)
        flat = [t.contiguous() for layer in new_cache.layers for t in (layer.keys, layer.values)]
        return (out.logits[:, -1, :], *flat)


def _kv_shapes(model: nn.Module, batch: int, past: int) -> list[tuple[int, ...]]:
    """Shapes of each layer's k and v for an example cache, read from a real one-token forward pass."""
    step = CachedStep(model)
    ids = torch.zeros(batch, past, dtype=torch.long, device=next(model.parameters()).device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        outputs = step(ids, mask, mask.cumsum(-1) - 1, mask.sum(-1))
    return [tuple(t.shape) for t in outputs[1:]]


def export_step(model: nn.Module, decode: bool) -> torch.fx.GraphModule:
    """The prefill (no cache in) or decode (one token, cache in) graph of the model, batch and lengths dynamic."""
    device = next(model.parameters()).device
    step = CachedStep(model)
    batch, seq = 2, (1 if decode else 8)
    total = EXAMPLE_PAST + seq if decode else seq
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    mask = torch.ones(batch, total, dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1)[:, -seq:]
    prompt = torch.full((batch,), total, dtype=torch.long, device=device)
    dyn = torch.export.Dim.DYNAMIC
    token_dims = {0: dyn} if decode else {0: dyn, 1: dyn}
    past: tuple[torch.Tensor, ...] = ()
    if decode:
        dtype = next(model.parameters()).dtype
        past = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in _kv_shapes(model, batch, EXAMPLE_PAST))
    args = (ids, mask, positions, prompt, past)
    shapes = (token_dims, {0: dyn, 1: dyn}, token_dims, {0: dyn}, tuple({0: dyn, 2: dyn} for _ in past))
    with torch.no_grad():
        program = torch.export.export(step, args, dynamic_shapes=shapes, strict=False,
                                      prefer_deferred_runtime_asserts_over_guards=True)
    return program.module()


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


def decode_loop(prefill, decode, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                sampling: Sampling, eos_token_ids: list[int], pad_token_id: int | None) -> torch.Tensor:
    """Greedy or sampled decoding with a KV cache; returns prompt + new tokens, like `model.generate`."""
    mask = attention_mask.to(torch.long)
    prompt_length = mask.sum(-1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits, *cache = prefill(input_ids, mask, positions, prompt_length, ())
    cache = [t.contiguous() for t in cache]  # a compiled prefill may lay the cache out otherwise
    tokens = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(eos_token_ids, device=input_ids.device) if eos_token_ids else None
    last_position = positions[:, -1:]
    for step in range(max_new_tokens):
        next_token = sampling.choose(logits)
        if eos is not None and pad_token_id is not None:
            next_token = torch.where(unfinished, next_token, torch.full_like(next_token, pad_token_id))
        tokens = torch.cat([tokens, next_token[:, None]], dim=-1)
        if eos is not None:
            unfinished &= ~torch.isin(next_token, eos)
            if not unfinished.any():
                break
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        last_position = last_position + 1
        logits, *cache = decode(next_token[:, None], mask, last_position, prompt_length, tuple(cache))
    return tokens
