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
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch
from torch import nn
from torch.fx import GraphModule

from .._compat import without_hooks
from ..lang.diagnostics import Diagnostic
from ..plan.archs import model_config, text_config
from . import disk

Signature = tuple[tuple[str, torch.dtype], ...]

log = logging.getLogger("garage")
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, GraphModule | TraceFailure]]" = weakref.WeakKeyDictionary()
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


FALLBACK = "hook-fallback"  # the rule of the warning that a spec runs by hooks


def fallback_warning(why: str, filename: str, what: str) -> Diagnostic:
    """The warning that says which graph could not be built, why, and what running by hooks costs."""
    reason = why.strip().splitlines()[0] if why.strip() else "unknown reason"
    return Diagnostic(
        "warning",
        f"garage cannot build this model's {what} graph ({reason}), so it runs the spec by forward hooks on "
        "the eager model, with the same ops: the numbers are the same, but there is no fx graph to read, "
        "torch.compile and .pt2 export do not apply, and each call is as slow as the eager model",
        filename, hint="set GARAGE_DEBUG=1 (or garage --debug) to see why tracing failed", rule=FALLBACK)


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
def scoring_config(model: nn.Module) -> Iterator[None]:
    """use_cache=False while scoring; set on the config, since as a kwarg it would become a graph input."""
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


def example_inputs(model: nn.Module, sig: Signature, shape: tuple[int, int] = (EXAMPLE_BATCH, EXAMPLE_SEQ)
                   ) -> dict[str, torch.Tensor]:
    device = model_device(model)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in sig:
        if name == "attention_mask":
            out[name] = torch.ones(*shape, dtype=dtype, device=device)
        elif name == "input_ids":
            out[name] = torch.randint(0, vocab_size(model), shape, generator=g).to(device, dtype)
        else:
            out[name] = torch.zeros(*shape, dtype=dtype, device=device)
    return out


class Static(NamedTuple):
    """The scoring graph of one input shape, for a model whose code fixes its sequence length (Mamba's,
    CPM-Ant's): traced again for each shape it is called with."""

    sig: Signature
    batch: int
    seq: int


def specialises(failure: TraceFailure) -> bool:
    """Whether export failed because the model's code fixes a dimension garage marked dynamic."""
    return "Constraints violated" in str(failure)


def static_warning(failure: TraceFailure, filename: str) -> Diagnostic:
    reason = str(failure).splitlines()[0]
    return Diagnostic("warning", f"torch.export cannot trace this model with a dynamic batch and sequence length "
                                 f"({reason}), so garage traces its scoring graph again for each input shape: the "
                                 "first call with a new shape takes seconds", filename,
                      hint="pad inputs to a few fixed lengths, or use garage.hook", rule="static-shapes")


def export_scoring(model: nn.Module, sig: Signature, shape: tuple[int, int] | None = None) -> GraphModule:
    """A fresh export of the model for full-sequence scoring: batch and sequence dynamic, or this shape."""
    inputs = example_inputs(model, sig, shape or (EXAMPLE_BATCH, EXAMPLE_SEQ))
    dims = None if shape else {name: {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for name in inputs}
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


def cached_graph(model: nn.Module, kind: str, make: Callable[[], GraphModule]) -> GraphModule:
    """The model's graph of this kind (a scoring signature, "step" or "unpadded"), made on first use,
    with any hooks on the model left out of it. A graph that cannot be made raises its TraceFailure, which
    is kept too: a model that fails to trace fails in seconds, and is not traced again for each spec."""
    param = next(model.parameters())
    key = (kind, model.training, param.device, param.dtype)
    with _LOCK:
        per_model = _CACHE.setdefault(model, {})
        if key not in per_model:
            try:
                failure = offloaded(model)
                if failure is not None:
                    raise failure
                per_model[key] = _load_or_export(model, kind, make)
            except TraceFailure as failure:
                per_model[key] = failure
        found = per_model[key]
        if isinstance(found, TraceFailure):
            raise found
        return found


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


def base_graph(model: nn.Module, sig: Signature, shape: tuple[int, int] | None = None) -> GraphModule:
    """The cached scoring graph of this model for this input signature (and shape, if static), exported on
    first use."""
    kind = repr(sig) if shape is None else f"{sig!r}@{shape[0]}x{shape[1]}"
    return cached_graph(model, kind, lambda: export_scoring(model, sig, shape))
