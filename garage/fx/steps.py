"""Graphs that wrap the model for generation and fast scoring: prefill, decode, and unpadded scoring.

The prefill step takes the prompt and returns the cache as flat k/v tensors. The decode step takes one
token and a preallocated cache (one [batch, kv_heads, max_length, head_dim] buffer per k and v) that it
writes in place at a slot given as a tensor, so every step has the same shapes: nothing grows, nothing is
copied, and a compiled decode graph never recompiles. Unwritten slots are hidden by the attention mask.
Every layer keeps a full-length cache; a sliding window is enforced by the model's own mask, which gives
the same attention as a cropped cache. The unpadded scoring graph passes no mask, so transformers can call
SDPA with `is_causal=True`.

In each of these graphs the model sits under `STEP_PREFIX`, and each is exported once per model.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import GraphModule
from transformers import DynamicCache

from .._compat import (
    attn_implementation,
    cache_from_flat,
    flat_cache,
    mask_skipping_allowed,
    slot_cache,
)
from ..plan.archs import text_config
from .export import cache_kwarg, cached_graph, example_inputs, exported, model_device

STEP_PREFIX = "model."  # these graphs wrap the model as `self.model`
EXAMPLE_PAST = 5


class UnpaddedScoring(nn.Module):
    """The model on a batch without padding. It passes an empty cache and no mask, which lets transformers
    leave the attention mask out and call SDPA with `is_causal=True` (its fast causal kernels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.model(input_ids=input_ids, use_cache=False, **{cache_kwarg(self.model): DynamicCache()})
        return type(out)(logits=out.logits)  # the cache stays inside the graph


def _step_kwargs(model: nn.Module) -> dict[str, Any]:
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

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            cache: DynamicCache) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **self.step_kwargs, **{self.cache_kwarg: cache})


class CachedStep(_Step):
    """One forward step with the KV cache as flat tensors: (ids, mask, positions, prompt_length, *kv) → (logits, *kv)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prompt_length: torch.Tensor, past: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, ...]:
        out = self.run(input_ids, attention_mask, position_ids, cache_from_flat(past))
        new_cache = getattr(out, self.cache_kwarg, None) or out.past_key_values
        return (out.logits[:, -1, :], *flat_cache(new_cache))


class SlotStep(_Step):
    """One decode step: (token, full-length mask, position, prompt_length, slot, cache buffers) → logits."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prompt_length: torch.Tensor, slot: torch.Tensor, past: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.run(input_ids, attention_mask, position_ids, slot_cache(past, slot)).logits[:, -1, :]


def _kv_shapes(model: nn.Module, batch: int, past: int) -> list[tuple[int, ...]]:
    """Shapes of each layer's k and v for an example cache, read from a real forward pass."""
    step = CachedStep(model)
    ids = torch.zeros(batch, past, dtype=torch.long, device=model_device(model))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        outputs = step(ids, mask, mask.cumsum(-1) - 1, mask.sum(-1))
    return [tuple(t.shape) for t in outputs[1:]]


def export_step(model: nn.Module, decode: bool) -> GraphModule:
    """The prefill (prompt in, cache out) or decode (one token, cache buffers written in place) graph of the
    model, with batch and lengths dynamic."""
    device = model_device(model)
    dyn = torch.export.Dim.DYNAMIC
    batch, total = 2, EXAMPLE_PAST + 1
    seq = 1 if decode else 8
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    prompt = torch.full((batch,), EXAMPLE_PAST, dtype=torch.long, device=device)
    step: nn.Module
    args: tuple
    shapes: tuple
    if decode:
        dtype = next(model.parameters()).dtype
        past = tuple(torch.zeros(shape[:2] + (total,) + shape[3:], dtype=dtype, device=device)
                     for shape in _kv_shapes(model, batch, EXAMPLE_PAST))
        mask = torch.ones(batch, total, dtype=torch.long, device=device)
        positions = torch.full((batch, 1), EXAMPLE_PAST, dtype=torch.long, device=device)
        slot = torch.full((1,), EXAMPLE_PAST, dtype=torch.long, device=device)
        step = SlotStep(model)
        args = (ids, mask, positions, prompt, slot, past)
        shapes = ({0: dyn}, {0: dyn, 1: dyn}, {0: dyn}, {0: dyn}, None, tuple({0: dyn, 2: dyn} for _ in past))
    else:
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        step = CachedStep(model)
        args = (ids, mask, mask.cumsum(-1) - 1, prompt, ())
        shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn}, ())
    with torch.no_grad():
        return exported(step, model, args, dynamic_shapes=shapes, prefer_deferred_runtime_asserts_over_guards=True)


def export_unpadded(model: nn.Module) -> GraphModule:
    """The scoring graph for batches without padding (input_ids only; sequences of 2 tokens or more)."""
    inputs = example_inputs(model, (("input_ids", torch.long),))
    dims = {"input_ids": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}}
    with mask_skipping_allowed(), torch.no_grad():
        return exported(UnpaddedScoring(model), model, (), inputs, dynamic_shapes=dims,
                        prefer_deferred_runtime_asserts_over_guards=True)


STEP_EXPORTERS: dict[str, Callable[[nn.Module], GraphModule]] = {
    "prefill": lambda model: export_step(model, decode=False),
    "decode": lambda model: export_step(model, decode=True),
    "unpadded": export_unpadded,
}


def step_graph(model: nn.Module, kind: str) -> GraphModule:
    """The model's "prefill", "decode" or "unpadded" graph, exported on first use and cached."""
    return cached_graph(model, kind, lambda: STEP_EXPORTERS[kind](model))


def unpadded_possible(model: nn.Module) -> bool:
    """Whether an unpadded batch can skip the attention mask: a causal LM on SDPA with no sliding windows."""
    config = text_config(model)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return bool(
        getattr(model, "can_generate", lambda: False)()
        and attn_implementation(config) == "sdpa"
        and not sliding
        and all(kind == "full_attention" for kind in layer_types)
    )
