"""Graphs that wrap the model for generation and fast scoring: the generation step, and unpadded scoring.

The step graph serves the whole of generation. It takes new tokens (the prompt, then one token at a
time) and a preallocated cache (one [batch, kv_heads, max_length, head_dim] buffer per k and v) that it
writes in place at the slots given as a tensor, and it returns the logits of the last position. So the
prompt and every decode step run the same graph: one export, nothing grows, nothing is copied, and a
compiled step never recompiles. Unwritten slots are hidden by the attention mask, which spans the whole
cache. Every layer keeps a full-length cache; a sliding window is enforced by the model's own mask, which
gives the same attention as a cropped cache. The unpadded scoring graph passes no mask, so transformers
can call SDPA with `is_causal=True`.

In each of these graphs the model sits under `STEP_PREFIX`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from transformers import DynamicCache

from .._compat import attn_implementation, flat_cache, mask_skipping_allowed, slot_cache
from ..plan.archs import text_config
from .export import TraceFailure, cache_kwarg, example_inputs, exported, model_device

STEP_PREFIX = "model."  # these graphs wrap the model as `self.model`
# What position-limited ops read in the step graph: its mask spans the whole cache, not the new tokens, so
# positions come from position_ids (and pad tokens of the prompt count as real: attention ignores them).
STEP_INPUTS = (None, "prompt_length", "position_ids", "input_ids")


class UnpaddedScoring(nn.Module):
    """The model on a batch without padding. It passes an empty cache and no mask, which lets transformers
    leave the attention mask out and call SDPA with `is_causal=True` (its fast causal kernels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.model(input_ids=input_ids, use_cache=False, **{cache_kwarg(self.model): DynamicCache()})
        return type(out)(logits=out.logits)  # the cache stays inside the graph


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward can run its LM head on chosen positions only (`logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def last_position(input_ids: torch.Tensor) -> torch.Tensor:
    """[length − 1]: the last position, as a 1-D index tensor rather than `logits_to_keep=1`. The int becomes
    a slice from −1 over the dynamic length, which Inductor before torch 2.13 cannot lower when sizes are
    size-oblivious (`LoweringException: KeyError: 'unbacked_bindings'`, seen on torch 2.11 and 2.12); an
    index tensor lowers to a gather on every version, with the same logits."""
    length = input_ids.shape[1]
    return torch.arange(length - 1, length, device=input_ids.device)


class SlotStep(nn.Module):
    """One generation step: (new tokens, cache-length mask, their positions, prompt lengths, their slots,
    cache buffers) → logits of the last position; the new tokens' keys and values are written at `slots`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cache_kwarg = cache_kwarg(model)
        self.keeps_logits = _keeps_logits(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prompt_length: torch.Tensor, slots: torch.Tensor, past: tuple[torch.Tensor, ...]) -> torch.Tensor:
        kwargs: dict[str, Any] = {"use_cache": True, self.cache_kwarg: slot_cache(past, slots)}
        if self.keeps_logits:  # the LM head on the last position only, named by a tensor: see `last_position`
            kwargs["logits_to_keep"] = last_position(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out.logits[:, -1, :]


def kv_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of each layer's k and v, read from a real forward pass of two tokens."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=model_device(model))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): DynamicCache()})
    cache = getattr(out, cache_kwarg(model), None) or out.past_key_values
    return [(t.shape[1], t.shape[3]) for t in flat_cache(cache)]


STEP_ARGS = 5  # ids, mask, positions, prompt lengths, slots; then the cache buffers


def cache_shapes(step: GraphModule) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of each cache buffer a step graph takes, read from its inputs' recorded shapes
    (so generating needs no extra forward pass, also when the graph came from the disk cache)."""
    buffers = [n for n in step.graph.nodes if n.op == "placeholder"][STEP_ARGS:]
    return [(int(n.meta["val"].shape[1]), int(n.meta["val"].shape[3])) for n in buffers]


def export_step(model: nn.Module) -> GraphModule:
    """The generation step graph, with batch, new tokens and cache length dynamic.

    The example has different sizes for each (batch 2, 8 new tokens, a 13-slot cache), so that export
    keeps them apart. A step of one token runs the same graph."""
    device = model_device(model)
    dyn = torch.export.Dim.DYNAMIC
    batch, seq, length = 2, 8, 13
    dtype = next(model.parameters()).dtype
    try:
        layers = kv_shapes(model)
    except Exception as err:  # the model's own forward failed on a real input: say so as a trace failure
        raise TraceFailure(model, err) from err
    past = tuple(torch.zeros(batch, heads, length, dim, dtype=dtype, device=device) for heads, dim in layers)
    shapes = (*STEP_DIMS, tuple({0: dyn, 2: dyn} for _ in past))
    with torch.no_grad():
        return exported(SlotStep(model), model, (*step_example(batch, seq, length, device), past),
                        dynamic_shapes=shapes, prefer_deferred_runtime_asserts_over_guards=True)


# The dynamic dimensions of a step graph's first STEP_ARGS inputs: new tokens, mask, positions, prompt lengths, slots.
STEP_DIMS = tuple({d: torch.export.Dim.DYNAMIC for d in dims} for dims in ((0, 1), (0, 1), (0, 1), (0,), (0,)))


def step_example(batch: int, seq: int, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A step graph's first STEP_ARGS example inputs: `seq` new tokens at the start of a `length`-slot cache."""
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    mask[:, :seq] = 1
    positions = torch.arange(seq, device=device).expand(batch, seq).contiguous()
    prompt = torch.full((batch,), seq, dtype=torch.long, device=device)
    return ids, mask, positions, prompt, torch.arange(seq, device=device)


def export_unpadded(model: nn.Module) -> GraphModule:
    """The scoring graph for batches without padding (input_ids only; sequences of 2 tokens or more)."""
    inputs = example_inputs(model, (("input_ids", torch.long),))
    dims = {"input_ids": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}}
    with mask_skipping_allowed(), torch.no_grad():
        return exported(UnpaddedScoring(model), model, (), inputs, dynamic_shapes=dims,
                        prefer_deferred_runtime_asserts_over_guards=True)


def can_generate(model: nn.Module) -> bool:
    return bool(getattr(model, "can_generate", lambda: False)())


def unpadded_possible(model: nn.Module) -> bool:
    """Whether an unpadded batch can skip the attention mask: a causal LM on SDPA with no sliding windows."""
    config = text_config(model)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return bool(
        can_generate(model)
        and attn_implementation(config) == "sdpa"
        and not sliding
        and all(kind == "full_attention" for kind in layer_types)
    )
