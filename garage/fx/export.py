"""Model → base GraphModule, by torch.export (non-strict) with dynamic batch and sequence.

Tracing costs seconds, so graphs are cached per model, kind (an input signature, or a step kind) and the
model's mode, device and dtype: compiling a second spec on the same model reuses the graph. The user's
model is left exactly as it was: the config's `use_cache` is set, and hooks on the model are set aside,
only for the duration of the export.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.fx import GraphModule

from .._compat import without_hooks
from ..plan.archs import model_config, text_config

Signature = tuple[tuple[str, torch.dtype], ...]

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, GraphModule]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8  # above 1, so export keeps both dimensions symbolic


def signature(inputs: Mapping[str, torch.Tensor]) -> Signature:
    return tuple(sorted((name, t.dtype) for name, t in inputs.items()))


SCORING: Signature = (("attention_mask", torch.long), ("input_ids", torch.long))  # the default scoring graph


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def vocab_size(model: nn.Module) -> int:
    return int(getattr(text_config(model), "vocab_size", 2) or 2)


@contextlib.contextmanager
def _scoring_config(model: nn.Module) -> Iterator[None]:
    """use_cache=False while exporting; set on the config, since as a kwarg it would become a graph input."""
    config = model_config(model)
    had = "use_cache" in config.__dict__
    old = config.__dict__.get("use_cache")
    config.use_cache = False
    try:
        yield
    finally:
        if had:
            config.use_cache = old
        else:
            config.__dict__.pop("use_cache", None)


def example_inputs(model: nn.Module, sig: Signature) -> dict[str, torch.Tensor]:
    device = model_device(model)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in sig:
        if name == "attention_mask":
            out[name] = torch.ones(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=dtype, device=device)
        elif name == "input_ids":
            out[name] = torch.randint(0, vocab_size(model), (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=g).to(device, dtype)
        else:
            out[name] = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=dtype, device=device)
    return out


def export_scoring(model: nn.Module, sig: Signature) -> GraphModule:
    """A fresh export of the model for full-sequence scoring, batch and sequence dynamic."""
    inputs = example_inputs(model, sig)
    dims = {name: {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for name in inputs}
    with _scoring_config(model), torch.no_grad():
        program = torch.export.export(model, (), inputs, strict=False, dynamic_shapes=dims)
    return program.module()


def cache_kwarg(model: nn.Module) -> str:
    """`cache` in recent transformers 5, `past_key_values` before it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cached_graph(model: nn.Module, kind: str, make: Callable[[], GraphModule]) -> GraphModule:
    """The model's graph of this kind (e.g. a scoring signature, "prefill", "decode"), made on first use,
    with any hooks on the model left out of it."""
    param = next(model.parameters())
    key = (kind, model.training, param.device, param.dtype)
    with _LOCK:
        per_model = _CACHE.setdefault(model, {})
        if key not in per_model:
            with without_hooks(model):
                per_model[key] = make()
        return per_model[key]


def base_graph(model: nn.Module, sig: Signature) -> GraphModule:
    """The cached scoring graph of this model for this input signature, exported on first use."""
    return cached_graph(model, repr(sig), lambda: export_scoring(model, sig))
