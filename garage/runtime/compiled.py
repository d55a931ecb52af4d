"""torch.compile of an injected graph, set up so that no new batch size or length ever recompiles."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.fx import GraphModule

from .._compat import mark_dynamic, materialize, size_oblivious
from ..fx.patch_source import WEIGHT_INPUT

# Per graph kind, the dynamic dimensions of each positional input (the scoring graph takes kwargs).
# The step graph: (ids, cache-length mask, positions, prompt lengths, slots, cache buffers), compiled twice:
# "step" for prompts (any length) and "token" for one new token at a time (its length stays 1).
_STEP_DIMS: dict[str, tuple[tuple[int, ...], ...]] = {
    "step": ((0, 1), (0, 1), (0, 1), (0,), (0,), ()),
    "token": ((0,), (0, 1), (0,), (0,), (), ()),
}


def _mark_dynamic(kind: str, args: tuple, kwargs: dict[str, torch.Tensor]) -> None:
    """Mark batch and length dimensions dynamic before a compiled call. A patch weight is left static: its
    size-1 dimensions broadcast, which a symbolic size could not."""
    for name, tensor in kwargs.items():
        for dim in range(min(tensor.dim(), 2) if name != WEIGHT_INPUT else 0):
            mark_dynamic(tensor, dim)
    for value, dims in zip(args, _STEP_DIMS.get(kind, ())):
        for dim in dims:
            mark_dynamic(value, dim)
    if kind in _STEP_DIMS:
        for buffer in args[-1]:  # the cache: batch and length
            mark_dynamic(buffer, 0)
            mark_dynamic(buffer, 2)


def compiled(gm: GraphModule, kind: str, options: dict[str, Any]) -> Callable[..., Any]:
    """`gm` under torch.compile (fullgraph), with batch and lengths dynamic from the first call, and
    size-1 dimensions kept symbolic, so a new length, batch 1, or the next decode step never recompiles.
    `kind` is "scoring", "step" or "token"."""
    materialize(gm)  # dynamo does not trace a lazily generated forward
    program = torch.compile(gm, **{"fullgraph": True, **options})  # one graph unless the user says otherwise

    def run(*args: Any, **kwargs: Any) -> Any:
        _mark_dynamic(kind, args, kwargs)
        with size_oblivious():
            return program(*args, **kwargs)

    return run
