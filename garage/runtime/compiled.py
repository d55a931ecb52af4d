"""torch.compile of an injected graph, set up so that no new batch size or length ever recompiles, and CUDA
graphs for the decode step when the mode asks for them.

`garage.compile(..., compile="reduce-overhead")` (or `{"mode": "reduce-overhead"}`, or "max-autotune") replays
CUDA graphs for the one-token decode step only, over cache buffers kept at fixed addresses
(`decode.KVBuffers`): that step is the launch-bound part of generation, and it has one shape per
generation. Scoring and the prompt step compile in the same mode without CUDA graphs, since a scoring
output belongs to the caller (a replay would overwrite it) and a graph per prompt length would cost memory
for nothing. Off CUDA there are no CUDA graphs: every graph is compiled in the plain mode, and the decode step
still runs over the kept buffers, so the CPU runs the same code.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping

import torch
from torch.fx import GraphModule

from .._compat import compile_settings, mark_dynamic, materialize
from ..fx.patch_source import WEIGHT_INPUT

# Per graph kind, the dynamic dimensions of each positional input (the scoring graph takes kwargs).
# The step graph: (ids, cache-length mask, positions, prompt lengths, slots, cache buffers), compiled twice:
# "step" for prompts (any length) and "token" for one new token at a time (its length stays 1).
_STEP_DIMS: dict[str, tuple[tuple[int, ...], ...]] = {
    "step": ((0, 1), (0, 1), (0, 1), (0,), (0,), ()),
    "token": ((0,), (0, 1), (0,), (0,), (), ()),
}
# torch.compile's modes that replay CUDA graphs, each with its mode without them.
CUDA_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's, 2.11–2.14

CompileSetting = bool | str | Mapping[str, Any]


def compile_options(setting: CompileSetting) -> dict[str, Any] | None:
    """torch.compile's keyword arguments for `garage.compile(..., compile=setting)`: None (eager) for False, {}
    for True, {"mode": setting} for a mode name, and a mapping as given."""
    if setting is False:
        return None
    if setting is True:
        return {}
    options = {"mode": setting} if isinstance(setting, str) else dict(setting) if isinstance(setting, Mapping) else None
    if options is None:
        raise TypeError(f"compile= takes True, a mode name or a dict of torch.compile options, not {setting!r}")
    if options.get("mode", "default") not in MODES:  # said now, not at the first call deep inside torch.compile
        raise ValueError(f"compile= names the mode {options['mode']!r}; torch.compile's modes are {', '.join(MODES)}")
    return options


def replays_cuda_graphs(options: Mapping[str, Any] | None) -> bool:
    """Whether these options ask for CUDA graphs (then generation keeps its cache buffers between calls)."""
    return options is not None and options.get("mode") in CUDA_GRAPH_MODES


def _on_cuda(gm: GraphModule) -> bool:
    return any(t.is_cuda for t in (next(gm.parameters(), None), next(gm.buffers(), None)) if t is not None)


def _mark_dynamic(kind: str, args: tuple, kwargs: dict[str, torch.Tensor], cache_marked: bool) -> None:
    """Mark batch and length dimensions dynamic before a compiled call. A patch weight is left static: its
    size-1 dimensions broadcast, which a symbolic size could not. The cache buffers (the same tensors at every
    step of a generation) are marked unless `cache_marked`."""
    for name, tensor in kwargs.items():
        for dim in range(min(tensor.dim(), 2) if name != WEIGHT_INPUT else 0):
            mark_dynamic(tensor, dim)
    for value, dims in zip(args, _STEP_DIMS.get(kind, ())):
        for dim in dims:
            mark_dynamic(value, dim)
    if kind in _STEP_DIMS and not cache_marked:
        for buffer in args[-1]:  # the cache: batch and length
            mark_dynamic(buffer, 0)
            mark_dynamic(buffer, 2)


def compiled(gm: GraphModule, kind: str, options: dict[str, Any]) -> Callable[..., Any]:
    """`gm` under torch.compile (fullgraph), with batch and lengths dynamic from the first call, and
    size-1 dimensions kept symbolic, so a new length, batch 1, or the next decode step never recompiles.
    `kind` is "scoring", "step" or "token"; only "token" on CUDA replays CUDA graphs (see the module's doc)."""
    materialize(gm)  # dynamo does not trace a lazily generated forward
    graphs = kind == "token" and replays_cuda_graphs(options) and _on_cuda(gm)
    if not graphs and options.get("mode") in CUDA_GRAPH_MODES:
        options = {**options, "mode": CUDA_GRAPH_MODES[options["mode"]]}
    program = torch.compile(gm, **{"fullgraph": True, **options})  # one graph unless the user says otherwise

    marked: weakref.ref | None = None  # the first cache buffer marked (a step's Python time counts on a GPU)

    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal marked
        first = args[-1][0] if kind in _STEP_DIMS and args[-1] else None
        _mark_dynamic(kind, args, kwargs, cache_marked=first is not None and marked is not None and marked() is first)
        marked = weakref.ref(first) if first is not None else None
        if graphs:  # the last step's outputs are read: the next replay may overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        with compile_settings():
            return program(*args, **kwargs)

    return run
