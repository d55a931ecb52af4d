"""Graphs for an encoder–decoder model's generation: the encoder once, then a decoder step over both caches.

`EncoderRun` is the encoder alone (source ids and mask → its last hidden states). `DecoderStep` is one step
of the decoder, as the causal LMs' step graph (`garage.fx.steps`) is one step of theirs: new target tokens
over a preallocated self-attention cache written in place at `slots`, the cache-length mask, and the
logits of the last position. Its cross-attention keys and values are a cache too: the first step
(`first=True`) computes them from the encoder's states and writes them into their buffers, and every later
step reads them there, as `model.generate` does, so a token costs no projection of the source. The two
steps are two graphs (whether cross-attention computes or reads is decided in Python, per layer).

In each graph the model sits under `STEP_PREFIX`; the step's inputs carry the decoder's names
(`decoder_input_ids`, `decoder_attention_mask`, …), so that position-limited ops at decoder sites read them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from transformers import EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from .._compat import both_caches, flat_cache
from ..plan.archs import model_config, text_config
from .export import TraceFailure, cache_kwarg, exported, model_device, vocab_size
from .steps import STEP_ARGS, STEP_DIMS, step_example

SEQ2SEQ_ARGS = STEP_ARGS  # target ids, mask, positions, prompt lengths, slots; then the buffers, encoder states, mask


def decoder_start(model: nn.Module) -> int:
    """The token an encoder–decoder model's decoder starts from, as `model.generate` chooses it: the generation
    config's (or the config's) `decoder_start_token_id`, else its `bos_token_id`."""
    configs = (getattr(model, "generation_config", None), model_config(model))
    for name in ("decoder_start_token_id", "bos_token_id"):
        token = next((t for c in configs if isinstance(t := getattr(c, name, None), int)), None)
        if token is not None:
            return token
    raise ValueError(f"{type(model).__name__} names neither a decoder_start_token_id nor a bos_token_id in its "
                     "config: set model.generation_config.decoder_start_token_id to the token its decoder starts from")


class EncoderRun(nn.Module):
    """The encoder of an encoder–decoder model on a source: its last hidden states."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoder: Any = getattr(self.model, "get_encoder")()
        return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class DecoderStep(nn.Module):
    """One decoder step: (new target tokens, cache-length mask, their positions, prompt lengths, their slots,
    (self k/v buffers, cross k/v buffers, encoder states, encoder mask)) → logits of the last position."""

    def __init__(self, model: nn.Module, layers: int, first: bool) -> None:
        super().__init__()
        self.model, self.layers, self.first = model, layers, first
        self.cache_kwarg = cache_kwarg(model)

    def forward(self, decoder_input_ids: torch.Tensor, decoder_attention_mask: torch.Tensor,
                decoder_position_ids: torch.Tensor, decoder_prompt_length: torch.Tensor, slots: torch.Tensor,
                past: tuple[torch.Tensor, ...]) -> torch.Tensor:
        encoder_states, encoder_mask = past[-2], past[-1]
        cache = both_caches(past[:-2], self.layers, slots, cross_ready=not self.first)
        out = self.model(attention_mask=encoder_mask, encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                         decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                         use_cache=True, **{self.cache_kwarg: cache})
        return out.logits[:, -1, :]


def cache_shapes(model: nn.Module) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(kv heads, head size) of each decoder layer's self-attention and cross-attention k and v, from a real
    forward pass of a 3-token source and a 2-token target."""
    device = model_device(model)
    source = torch.zeros(1, 3, dtype=torch.long, device=device)
    target = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=source, decoder_input_ids=target, use_cache=True)
    cache = out.past_key_values
    if not isinstance(cache, EncoderDecoderCache):
        raise TypeError(f"its cache is a {type(cache).__name__}, not an EncoderDecoderCache")
    shapes = [[(t.shape[1], t.shape[3]) for t in flat_cache(part)]
              for part in (cache.self_attention_cache, cache.cross_attention_cache)]
    return shapes[0], shapes[1]


def export_encoder(model: nn.Module) -> GraphModule:
    """The encoder graph, batch and source length dynamic."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":  # Whisper's: audio features
        raise TraceFailure(model, RuntimeError(f"its encoder reads {getattr(model, 'main_input_name')}, and garage's "
                                               "encoder graph reads token ids"))
    device = model_device(model)
    ids = torch.randint(0, vocab_size(model), (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    dyn = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        return exported(EncoderRun(model), model, (ids, mask), dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}))


def export_decoder_step(model: nn.Module, first: bool) -> GraphModule:
    """A decoder step graph, with batch, new tokens, cache length and source length dynamic (the example has
    different sizes for each: batch 2, 3 new tokens, 11 cache slots, a source of 7)."""
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    try:
        own, cross = cache_shapes(model)
    except Exception as err:  # the model's own forward failed on a real input: say so as a trace failure
        raise TraceFailure(model, err) from err
    batch, seq, length, source = 2, 3, 11, 7
    hidden = int(text_config(model).hidden_size)
    buffers = [torch.zeros(batch, h, length, d, dtype=dtype, device=device) for h, d in own]
    buffers += [torch.zeros(batch, h, source, d, dtype=dtype, device=device) for h, d in cross]
    past = (*buffers, torch.randn(batch, source, hidden, dtype=dtype, device=device),
            torch.ones(batch, source, dtype=torch.long, device=device))
    dyn = torch.export.Dim.DYNAMIC
    shapes = (*STEP_DIMS, (*({0: dyn, 2: dyn} for _ in buffers), {0: dyn, 1: dyn}, {0: dyn, 1: dyn}))
    with torch.no_grad():
        return exported(DecoderStep(model, len(own) // 2, first), model,
                        (*step_example(batch, seq, length, device), past), dynamic_shapes=shapes,
                        prefer_deferred_runtime_asserts_over_guards=True)


def step_buffers(step: GraphModule) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(kv heads, head size) of each self-attention and cross-attention buffer a decoder step graph takes."""
    buffers = [n for n in step.graph.nodes if n.op == "placeholder"][SEQ2SEQ_ARGS:-2]
    shapes = [(int(n.meta["val"].shape[1]), int(n.meta["val"].shape[3])) for n in buffers]
    return shapes[:len(shapes) // 2], shapes[len(shapes) // 2:]
