"""The one owner of base graphs: where each comes from, and what stands in when one cannot be traced.

A graph is asked for by model and kind (`garage.fx.kinds`). It comes from memory (per model object, mode,
device and dtype), else from garage's disk cache, else from a fresh export, which is then kept in both.
A trace failure is kept in memory too, so a model that fails to trace fails in seconds, not again for
each spec. On disk an entry is a sealed cache folder (`garage._cache`) in the `_graph_format` form, keyed
by everything the graph depends on (`fingerprint`); the weights stay out, since a loaded graph is bound
to the live model's own parameters. Processes that need the same graph take its lock in turn, so it is
exported once.

`route` is the fallback policy, and the only place it lives. It gives the graph of the kind asked for,
placed by the caller's function, or what stands in: the padded scoring graph for the unpadded one, a
graph per input shape for a model whose code fixes its sequence length, or forward hooks on the eager
model, each with the one warning that says so. `refused` decides the same when a graph's input guards
refuse an input at run time. A model whose forward another library replaced is never run by hooks.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

import torch
import transformers
from torch import nn
from torch.fx import GraphModule

from .. import _cache, _compat, _graph_format, _guards
from .._compat import attn_implementation, is_guard_failure, without_hooks
from .._version import __version__
from ..lang.diagnostics import Diagnostic
from ..plan.archs import config_hash
from . import export, kinds, steps
from .export import EXAMPLE_BATCH, EXAMPLE_SEQ, TraceFailure, offloaded
from .kinds import GraphKind, Shape, Static, checked_kinds, scoring_kind
from .locate import SiteNotFound

log = logging.getLogger("garage")
T = TypeVar("T")
FALLBACK = "hook-fallback"  # the rule of the warning that a use runs by hooks
STATIC = "static-shapes"  # the rule of the warning that scoring traces a graph per input shape

_MEMORY: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, GraphModule | TraceFailure]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


# ------------------------------------------------------------------ graphs
def graph(model: nn.Module, kind: GraphKind) -> GraphModule:
    """The model's base graph of this kind, with any hooks on the model left out of it; a TraceFailure when
    it cannot be traced (kept, and raised again at once on the next ask)."""
    param = next(model.parameters())
    key = (kind.key, model.training, param.device, param.dtype)
    with _LOCK:
        per_model = _MEMORY.setdefault(model, {})
        if key not in per_model:
            try:
                failure = offloaded(model)
                if failure is not None:
                    raise failure
                per_model[key] = _load_or_export(model, kind)
            except TraceFailure as failure:
                per_model[key] = failure
        found = per_model[key]
    if isinstance(found, TraceFailure):
        raise found
    return found


def _load_or_export(model: nn.Module, kind: GraphKind) -> GraphModule:
    """From the disk cache when an earlier process exported this graph; else exported, and kept."""
    start = time.perf_counter()
    with without_hooks(model):
        folder = entry(model, kind)  # keyed once: the key reads the model's source files
        if folder is None:
            return _exported(model, kind, start)
        with _cache.locked(folder):  # another process exporting it: wait, then load what it wrote
            found = read_entry(folder, model, kind)
            if found is not None:
                log.info("loaded the cached %s graph of %s in %.2f s", kind.key, type(model).__name__,
                         time.perf_counter() - start)
                return found
            made = _exported(model, kind, start)
            write_entry(folder, model, kind, made)
    return made


def _exported(model: nn.Module, kind: GraphKind, start: float) -> GraphModule:
    made = kind.export(model)
    log.info("exported the %s graph of %s in %.1f s", kind.key, type(model).__name__, time.perf_counter() - start)
    return made


# ------------------------------------------------------------------ the disk cache
@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """garage's own graph-producing code: an edited or upgraded garage (one version string for every
    editable install) exports again instead of serving a stale graph."""
    digest = hashlib.sha256()
    for module in (_compat, _graph_format, _guards, export, kinds, steps, sys.modules[__name__]):
        digest.update(Path(inspect.getsourcefile(module) or "").read_bytes())
    return digest.hexdigest()


def _source_hash(classes: set[type]) -> str:
    """The source files that define these classes: a changed modeling file is a different graph.
    An OSError or TypeError (a class without a readable file) means: do not cache."""
    digest = hashlib.sha256()
    for path in sorted({inspect.getsourcefile(cls) or "" for cls in classes} - {""}):
        digest.update(path.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def fingerprint(model: nn.Module, kind: GraphKind) -> str | None:
    """The cache key of this model's graph of this kind, or None when it must not (or cannot) be cached:
    torch, transformers and garage (its version and its graph code), the model's class, config (less where
    it was loaded from), module tree, every parameter's and buffer's name, shape and dtype, the source files
    of the classes in its tree, the graph kind, mode, device and dtype."""
    try:
        return _fingerprint(model, kind)
    except Exception as err:  # an unusual model (unreadable source, a config that will not serialise)
        log.debug("not caching graphs of %s: %s: %s", type(model).__name__, type(err).__name__, err)
        return None


def _fingerprint(model: nn.Module, kind: GraphKind) -> str | None:
    modules = list(model.named_modules(remove_duplicate=False))
    if any("forward" in vars(m) for _, m in modules):  # a forward set on an instance: its code has no file
        return None
    classes = {type(m) for _, m in modules}
    if any(cls.__module__ == "__main__" for cls in classes):  # a script's own classes change unseen
        return None
    param = next(model.parameters())
    tensors = [(name, list(t.shape), str(t.dtype), t.requires_grad)
               for name, t in [*model.named_parameters(remove_duplicate=False),
                               *model.named_buffers(remove_duplicate=False)]]
    config = getattr(model, "config", None)
    description = {
        "format": _graph_format.FORMAT, "garage": __version__, "code": _code_hash(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": sys.version_info[:2],
        "class": f"{type(model).__module__}.{type(model).__qualname__}", "config": config_hash(model),
        "attn": attn_implementation(config), "tree": [(name, f"{type(m).__module__}.{type(m).__qualname__}")
                                                       for name, m in modules],
        "tensors": tensors, "sources": _source_hash(classes), "kind": kind.key, "training": model.training,
        "device": str(param.device), "dtype": str(param.dtype),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:32]


def entry(model: nn.Module, kind: GraphKind) -> Path | None:
    """The cache folder of this model's graph of this kind (it may not exist yet); None: not cached."""
    key = fingerprint(model, kind)
    return _cache.entry("graphs", key) if key else None


def read_entry(folder: Path, model: nn.Module, kind: GraphKind) -> GraphModule | None:
    """The graph cached in `folder`, bound to `model`'s parameters; None when there is none, or it is unusable."""
    files = _cache.read(folder)  # sealed: a damaged or forged entry is deleted there, with a warning
    if files is None:
        return None
    try:
        desc, tensors = _graph_format.parse(files, device=str(next(model.parameters()).device))
        return _graph_format.load(desc, tensors, model)
    except Exception as err:  # an entry this garage cannot use costs an export, never a wrong graph
        log.warning("ignoring the cached %s graph in %s (%s: %s); exporting again", kind.key, folder,
                    type(err).__name__, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def write_entry(folder: Path, model: nn.Module, kind: GraphKind, made: GraphModule) -> None:
    """Keep the graph in `folder` for later processes; a graph the format cannot hold safely is not kept."""
    if folder.exists():
        return
    try:
        desc, tensors = _graph_format.dump(made, model)
        with _cache.writing(folder) as tmp:
            _graph_format.save(str(tmp), desc, tensors)
    except _graph_format.Unsupported as err:  # something the format does not hold: export it each time
        log.debug("not caching the %s graph of %s: %s", kind.key, type(model).__name__, err)
    except Exception as err:  # a full disk, a read-only cache, a graph the format trips on: never fatal
        log.warning("could not cache the %s graph in %s: %s: %s", kind.key, folder, type(err).__name__, err)


# ------------------------------------------------------------------ the fallback policy
@dataclass(frozen=True)
class Route(Generic[T]):
    """What serves a use: the graph of `kind` with what the caller placed on it, or forward hooks (`kind`
    None); and the warning that says why it is not the graph asked for."""

    kind: GraphKind | None
    value: T | None = None
    warning: Diagnostic | None = None


def route(model: nn.Module, kind: GraphKind, place: Callable[[GraphKind, GraphModule], T], filename: str,
          shape: Shape = (EXAMPLE_BATCH, EXAMPLE_SEQ)) -> Route[T]:
    """The graph of `kind` for a call of this shape, with `place` run on it, or what stands in for it.

    A spec that cannot be placed (SiteNotFound) is the spec's error for scoring, and runs by hooks for
    generation. A model whose forward was replaced raises its TraceFailure: a wrapper is not hooked."""
    warning = None
    while True:
        try:
            return Route(kind, place(kind, graph(model, kind)), warning)
        except TraceFailure as failure:
            if failure.patched_forward:
                raise
            instead = kind.instead(failure, shape)
            if instead is None:
                return Route(None, None, hook_warning(str(failure), filename, kind.use))
            if isinstance(instead, Static):
                warning = static_warning(failure, filename)
            kind = instead
        except SiteNotFound as err:
            if kind.use != "generation":
                raise
            return Route(None, None, hook_warning(f"the spec cannot be placed in its step graph: {err}", filename,
                                                  kind.use))


def checked_graph(model: nn.Module, filename: str, scoring: bool = False) -> Route[GraphModule]:
    """The graph a spec is checked on: the first of `checked_kinds` that traces (for a causal LM the
    generation step, what `garage run` needs first, so checking costs no extra export; the scoring graph
    when `scoring`, for a spec that only scores), else what stands in for the last, a graph of the example
    shape or hooks (kind None)."""
    kinds: list[GraphKind] = [scoring_kind(model)] if scoring else checked_kinds(model)
    for kind in kinds[:-1]:
        try:
            return Route(kind, graph(model, kind))
        except TraceFailure as failure:  # e.g. a cache kind the step cannot hold: check on the scoring graph
            if failure.patched_forward:
                raise
    return route(model, kinds[-1], lambda _kind, base: base, filename)


def refused(err: BaseException, use: str, filename: str) -> Route[None]:
    """Forward hooks, when a graph's input guards refused a call (DeepSeek-V4's short prompts); any other
    error is raised again."""
    if not is_guard_failure(err):
        raise err
    return Route(None, None, hook_warning(f"its traced graph does not hold for this input: {err}", filename, use))


def trace_diagnostic(failure: TraceFailure, filename: str, graph: str = "") -> Diagnostic:
    """The error a user sees when their model cannot be traced; with GARAGE_DEBUG set, torch's traceback too."""
    message = f"cannot trace this model{f' for its {graph} graph' if graph else ''} with torch.export: {failure}"
    if os.environ.get("GARAGE_DEBUG") and failure.__cause__ is not None:
        message += "\n" + "".join(traceback.format_exception(failure.__cause__)).rstrip()
    hint = ("compile the unwrapped model: garage traces the model's own forward" if failure.patched_forward else
            "check that the model runs on input_ids and attention_mask; set GARAGE_DEBUG=1 (or garage --debug) "
            "for torch's traceback")
    return Diagnostic("error", message, filename, hint=hint)


def hook_warning(why: str, filename: str, use: str) -> Diagnostic:
    """The warning that says which use runs by hooks, why, and what that costs."""
    reason = why.strip().splitlines()[0] if why.strip() else "unknown reason"
    return Diagnostic(
        "warning",
        f"garage cannot build this model's {use} graph ({reason}), so it runs the spec by forward hooks on "
        "the eager model, with the same ops: the numbers are the same, but there is no fx graph to read, "
        "torch.compile and .pt2 export do not apply, and each call is as slow as the eager model",
        filename, hint="set GARAGE_DEBUG=1 (or garage --debug) to see why tracing failed", rule=FALLBACK)


def static_warning(failure: TraceFailure, filename: str) -> Diagnostic:
    reason = str(failure).splitlines()[0]
    return Diagnostic("warning", f"torch.export cannot trace this model with a dynamic batch and sequence length "
                                 f"({reason}), so garage traces its scoring graph again for each input shape: the "
                                 "first call with a new shape takes seconds", filename,
                      hint="pad inputs to a few fixed lengths, or use garage.hook", rule=STATIC)


__all__ = ["FALLBACK", "STATIC", "Route", "checked_graph", "entry", "fingerprint", "graph", "hook_warning", "read_entry", "refused",
           "route", "static_warning", "trace_diagnostic", "write_entry"]
