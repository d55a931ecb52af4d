"""KV-cache decoding through injected graphs: a prefill graph and a decode graph, exported once per model.

The prefill step takes the prompt and returns the cache as flat k/v tensors. The decode step takes
one token and a preallocated cache (one [batch, kv_heads, max_length, head_dim] buffer per k and v)
that it writes in place at a slot given as a tensor, so every step has the same shapes: nothing grows,
nothing is copied, and a compiled decode graph never recompiles. Unwritten slots are hidden by the
attention mask. Every layer keeps a full-length cache; a sliding window is enforced by the model's own
mask, which gives the same attention as a cropped cache. Inputs follow `model.generate`: position ids
from the attention mask (left padding), and greedy or sampled tokens chosen as HF's logits processors
do (temperature, then top-k, then top-p).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .trace import cache_kwarg

EXAMPLE_PAST = 5


def _step_kwargs(model: nn.Module) -> dict:
    """Fixed forward kwargs of a generation step: the LM head runs on the last position only."""
    params = inspect.signature(model.forward).parameters
    return {"use_cache": True, **({"logits_to_keep": 1} if "logits_to_keep" in params else {})}


class _Step(nn.Module):
    """A generation step around the model: calls it with a given cache and the fixed step kwargs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cache_kwarg = cache_kwarg(model)
        self.step_kwargs = _step_kwargs(model)

    def run(self, input_ids, attention_mask, position_ids, cache):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **self.step_kwargs, **{self.cache_kwarg: cache})


class CachedStep(_Step):
    """One forward step with the KV cache as flat tensors: (ids, mask, positions, prompt_length, *kv) → (logits, *kv)."""

    def forward(self, input_ids, attention_mask, position_ids, prompt_length, past: tuple[torch.Tensor, ...] = ()):
        cache = DynamicCache(list(zip(past[0::2], past[1::2]))) if past else DynamicCache()
        out = self.run(input_ids, attention_mask, position_ids, cache)
        new_cache = getattr(out, self.cache_kwarg, None) or out.past_key_values
        flat = [t for layer in new_cache.layers for t in (layer.keys, layer.values)]
        return (out.logits[:, -1, :], *flat)


class SlotLayer(DynamicLayer):
    """A preallocated cache layer, written in place at `slot` (a 1-element tensor) instead of grown."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.slot = keys, values, slot
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.slot, key_states)
        self.values.index_copy_(2, self.slot, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> torch.Tensor:  # the query offset the mask functions need, as a tensor
        return self.slot[0]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0


class SlotStep(_Step):
    """One decode step: (token, full-length mask, position, prompt_length, slot, cache buffers) → logits."""

    def forward(self, input_ids, attention_mask, position_ids, prompt_length, slot, past: tuple[torch.Tensor, ...]):
        cache = DynamicCache()
        cache.layers = [SlotLayer(k, v, slot) for k, v in zip(past[0::2], past[1::2])]
        return self.run(input_ids, attention_mask, position_ids, cache).logits[:, -1, :]


def _kv_shapes(model: nn.Module, batch: int, past: int) -> list[tuple[int, ...]]:
    """Shapes of each layer's k and v for an example cache, read from a real one-token forward pass."""
    step = CachedStep(model)
    ids = torch.zeros(batch, past, dtype=torch.long, device=next(model.parameters()).device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        outputs = step(ids, mask, mask.cumsum(-1) - 1, mask.sum(-1))
    return [tuple(t.shape) for t in outputs[1:]]


def export_step(model: nn.Module, decode: bool) -> torch.fx.GraphModule:
    """The prefill (prompt in, cache out) or decode (one token, cache buffers written in place) graph of the
    model, with batch and lengths dynamic."""
    device = next(model.parameters()).device
    dyn = torch.export.Dim.DYNAMIC
    batch, total = 2, EXAMPLE_PAST + 1
    seq = 1 if decode else 8
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    prompt = torch.full((batch,), EXAMPLE_PAST, dtype=torch.long, device=device)
    if decode:
        dtype = next(model.parameters()).dtype
        past = tuple(torch.zeros(shape[:2] + (total,) + shape[3:], dtype=dtype, device=device)
                     for shape in _kv_shapes(model, batch, EXAMPLE_PAST))
        mask = torch.ones(batch, total, dtype=torch.long, device=device)
        positions = torch.full((batch, 1), EXAMPLE_PAST, dtype=torch.long, device=device)
        slot = torch.full((1,), EXAMPLE_PAST, dtype=torch.long, device=device)
        step: nn.Module = SlotStep(model)
        args: tuple = (ids, mask, positions, prompt, slot, past)
        shapes: tuple = ({0: dyn}, {0: dyn, 1: dyn}, {0: dyn}, {0: dyn}, None, tuple({0: dyn, 2: dyn} for _ in past))
    else:
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        step = CachedStep(model)
        args = (ids, mask, mask.cumsum(-1) - 1, prompt, ())
        shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn}, ())
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
    batch, prompt_tokens = input_ids.shape
    prompt_length = mask.sum(-1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits, *prompt_cache = prefill(input_ids, mask, positions, prompt_length, ())
    length = prompt_tokens + max_new_tokens
    cache = []
    for t in prompt_cache:  # preallocated buffers the decode graph writes in place
        buffer = t.new_zeros(t.shape[0], t.shape[1], length, t.shape[3])
        buffer[:, :, :prompt_tokens] = t
        cache.append(buffer)
    full_mask = torch.cat([mask, mask.new_zeros(batch, max_new_tokens)], dim=-1)
    tokens = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
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
        slot = prompt_tokens + step
        full_mask[:, slot] = 1
        last_position = last_position + 1
        slot_tensor = torch.full((1,), slot, dtype=torch.long, device=input_ids.device)
        logits = decode(next_token[:, None], full_mask, last_position, prompt_length, slot_tensor, tuple(cache))
    return tokens
