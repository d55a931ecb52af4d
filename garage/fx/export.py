"""Model → base GraphModule, by torch.export (non-strict) with dynamic batch and sequence.

Tracing costs seconds, so graphs are cached per model, kind (an input signature, or a step kind) and the
model's mode, device and dtype: compiling a second spec on the same model reuses the graph. They are also
kept on disk (`fx.disk`), so that a new process loads them in a fraction of a second. The user's
model is left exactly as it was: the config's `use_cache` is set, and hooks on the model are set aside,
only for the duration of the export.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.fx import GraphModule

from .._compat import without_hooks
from ..lang.diagnostics import Diagnostic
from ..plan.archs import model_config, text_config
from . import disk

Signature = tuple[tuple[str, torch.dtype], ...]

log = logging.getLogger("garage")
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, GraphModule]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
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


def trace_diagnostic(failure: TraceFailure, filename: str, graph: str = "") -> Diagnostic:
    """The error a user sees when their model cannot be traced; with GARAGE_DEBUG set, torch's traceback too."""
    message = f"cannot trace this model{f' for its {graph} graph' if graph else ''} with torch.export: {failure}"
    if os.environ.get("GARAGE_DEBUG") and failure.__cause__ is not None:
        message += "\n" + "".join(traceback.format_exception(failure.__cause__)).rstrip()
    hint = ("compile the unwrapped model: garage traces the model's own forward" if failure.patched_forward else
            "check that the model runs on input_ids and attention_mask; set GARAGE_DEBUG=1 (or garage --debug) "
            "for torch's traceback")
    return Diagnostic("error", message, filename, hint=hint)


def forward_patch(model: nn.Module) -> str | None:
    """The name of a function set as `forward` on the model instance (as wrapping libraries do), if any."""
    patched = vars(model).get("forward")
    if patched is None:
        return None
    return f"{getattr(patched, '__module__', '?')}.{getattr(patched, '__qualname__', type(patched).__name__)}"


def exported(module: nn.Module, model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None,
             **options: Any) -> GraphModule:
    """`torch.export.export(module, …).module()` in non-strict mode; a failure is a TraceFailure (about
    `model`, the user's model inside `module`) that keeps torch's error as its cause."""
    try:
        program = torch.export.export(module, args, kwargs, strict=False, **options)
    except Exception as err:  # the model's code, or a wrapper's, failed under export
        raise TraceFailure(model, err) from err
    return program.module()


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
        return exported(model, model, (), inputs, dynamic_shapes=dims)


def cache_kwarg(model: nn.Module) -> str:
    """`cache` in recent transformers 5, `past_key_values` before it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cached_graph(model: nn.Module, kind: str, make: Callable[[], GraphModule]) -> GraphModule:
    """The model's graph of this kind (a scoring signature, "step" or "unpadded"), made on first use,
    with any hooks on the model left out of it."""
    param = next(model.parameters())
    key = (kind, model.training, param.device, param.dtype)
    with _LOCK:
        per_model = _CACHE.setdefault(model, {})
        if key not in per_model:
            per_model[key] = _load_or_export(model, kind, make)
        return per_model[key]


def _load_or_export(model: nn.Module, kind: str, make: Callable[[], GraphModule]) -> GraphModule:
    """From garage's disk cache when an earlier process exported this graph; else exported, and kept."""
    start = time.perf_counter()
    with without_hooks(model):
        folder = disk.entry(model, kind)  # keyed once: the key reads the model's source files
        graph = disk.load(folder, model, kind)
        if graph is not None:
            log.info("loaded the cached %s graph of %s in %.2f s", kind, type(model).__name__,
                     time.perf_counter() - start)
            return graph
        graph = make()
        log.info("exported the %s graph of %s in %.1f s", kind, type(model).__name__, time.perf_counter() - start)
        disk.store(folder, model, kind, graph)
    return graph


def base_graph(model: nn.Module, sig: Signature) -> GraphModule:
    """The cached scoring graph of this model for this input signature, exported on first use."""
    return cached_graph(model, repr(sig), lambda: export_scoring(model, sig))
