"""Model → base GraphModule, by torch.export (non-strict): the tracing itself, with nothing cached.

Which graphs exist is `garage.fx.kinds`; where they are kept, and what stands in when one cannot be
traced, is `garage.fx.store`. The user's model is left exactly as it was: the config's `use_cache` is set
only for the duration of an export.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.fx import GraphModule

from .._compat import module_with_guard_source, stack_traces
from .._graph_format import GUARD_SOURCE
from ..plan.archs import model_config, text_config

Signature = tuple[tuple[str, torch.dtype], ...]

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8  # above 1, so export keeps both dimensions symbolic


class TraceFailure(Exception):
    """torch.export could not trace the model. Raised from the export error, which it keeps as its cause."""

    def __init__(self, model: nn.Module, err: Exception) -> None:
        self.patched_forward = forward_patch(model)
        message = f"{type(err).__name__}: {err}".strip()
        if self.patched_forward:
            message = (f"its forward was replaced on the instance by {self.patched_forward} (another library "
                       f"wraps this model), and torch.export failed on it: {message}")
        super().__init__(message)


def forward_patch(model: nn.Module) -> str | None:
    """The name of a function set as `forward` on the model instance (as wrapping libraries do), if any."""
    patched = vars(model).get("forward")
    if patched is None or hasattr(model, "_hf_hook"):  # accelerate's dispatch hooks: known, and run by hooks
        return None
    return f"{getattr(patched, '__module__', '?')}.{getattr(patched, '__qualname__', type(patched).__name__)}"


def exported(module: nn.Module, model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None,
             **options: Any) -> GraphModule:
    """`torch.export.export(module, …).module()` in non-strict mode; a failure is a TraceFailure (about
    `model`, the user's model inside `module`) that keeps torch's error as its cause."""
    try:
        with stack_traces(keep=bool(os.environ.get("GARAGE_DEBUG"))):
            program = torch.export.export(module, args, kwargs, strict=False, **options)
    except Exception as err:  # the model's code, or a wrapper's, failed under export
        raise TraceFailure(model, err) from err
    return module_with_guard_source(program, GUARD_SOURCE)


def signature(inputs: Mapping[str, torch.Tensor]) -> Signature:
    return tuple(sorted((name, t.dtype) for name, t in inputs.items()))


def with_masks(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs with a mask of ones for the ids (and an encoder–decoder model's target ids) that have none,
    so that one scoring graph serves calls with and without masks."""
    for prefix in ("", "decoder_"):
        if f"{prefix}input_ids" in inputs:
            inputs.setdefault(f"{prefix}attention_mask", torch.ones_like(inputs[f"{prefix}input_ids"]))
    return inputs


SCORING_INPUTS: Signature = (("attention_mask", torch.long), ("input_ids", torch.long))  # the default scoring graph
# An encoder–decoder model scores a target given a source: both with their masks (or audio features, for a
# speech model whose encoder reads `input_features`).
SEQ2SEQ_INPUTS: Signature = (("attention_mask", torch.long), ("decoder_attention_mask", torch.long),
                             ("decoder_input_ids", torch.long), ("input_ids", torch.long))
FEATURES = "input_features"


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model_config(model), "is_encoder_decoder", False))


def scoring_signature(model: nn.Module) -> Signature:
    """The inputs of a model's default scoring graph."""
    if not is_encoder_decoder(model):
        return SCORING_INPUTS
    if getattr(model, "main_input_name", "input_ids") == FEATURES:
        return (("decoder_attention_mask", torch.long), ("decoder_input_ids", torch.long), (FEATURES, torch.float32))
    return SEQ2SEQ_INPUTS


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def vocab_size(model: nn.Module) -> int:
    return int(getattr(text_config(model), "vocab_size", 2) or 2)


@contextlib.contextmanager
def scoring_config(model: nn.Module) -> Iterator[None]:
    """use_cache=False while scoring; set on the config, since as a kwarg it would become a graph input. Set on
    every config the model's modules hold: T5's stacks keep copies of their own."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "__dict__") and hasattr(c, "use_cache")}
    saved = [(c, "use_cache" in c.__dict__, c.__dict__.get("use_cache")) for c in configs.values()]
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config, had, old in saved:
            if had:
                config.use_cache = old
            else:
                config.__dict__.pop("use_cache", None)


def example_inputs(model: nn.Module, sig: Signature, shape: tuple[int, int] = (EXAMPLE_BATCH, EXAMPLE_SEQ)
                   ) -> dict[str, torch.Tensor]:
    """Inputs of this signature and shape: ids, masks of ones, a decoder's two tokens shorter (so that export
    keeps its length apart from the source's), and audio features of the length the model's encoder takes."""
    device = model_device(model)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in sig:
        size = (shape[0], max(shape[1] - 2, 2)) if name.startswith("decoder_") else shape
        if name.endswith("attention_mask"):
            out[name] = torch.ones(*size, dtype=dtype, device=device)
        elif name.endswith("input_ids"):
            out[name] = torch.randint(0, vocab_size(model), size, generator=g).to(device, dtype)
        elif name == FEATURES:
            out[name] = torch.randn(shape[0], *feature_shape(model), generator=g).to(device, dtype)
        else:
            out[name] = torch.zeros(*size, dtype=dtype, device=device)
    return out


def feature_shape(model: nn.Module) -> tuple[int, int]:
    """[mel bins, frames] of the audio features a speech encoder takes (Whisper's: always 2 × its positions)."""
    config = model_config(model)
    return int(config.num_mel_bins), 2 * int(config.max_source_positions)


def export_scoring(model: nn.Module, sig: Signature, shape: tuple[int, int] | None = None) -> GraphModule:
    """A fresh export of the model for full-sequence scoring: batch and sequence dynamic, or this shape."""
    inputs = example_inputs(model, sig, shape or (EXAMPLE_BATCH, EXAMPLE_SEQ))
    dynamic = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    dims = None if shape else {name: {0: dynamic[0]} if name == FEATURES else dynamic for name in inputs}
    with scoring_config(model), torch.no_grad():
        return exported(model, model, (), inputs, dynamic_shapes=dims)


def cache_kwarg(model: nn.Module) -> str:
    """`cache` in recent transformers 5, `past_key_values` before it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def offloaded(model: nn.Module) -> TraceFailure | None:
    """Why the model cannot be traced, known before trying: parameters that accelerate offloads (kept on the
    meta device, loaded by its hooks at each call), which torch.export cannot follow."""
    if not any(p.is_meta for p in model.parameters()):
        return None
    where = "disk" if "disk" in {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()} else "the CPU"
    return TraceFailure(model, RuntimeError(f"accelerate offloads some of its layers to {where} (device_map) and "
                                            "loads them at each call"))
