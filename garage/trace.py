"""Model → base GraphModule, by torch.export (non-strict) with dynamic batch and sequence.

Tracing costs seconds, so base graphs are cached per model and input signature: compiling a second
spec on the same model reuses the graph. The user's model is left exactly as it was: the config's
`use_cache` is set, and hooks on the model are set aside, only for the duration of the export.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from transformers import DynamicCache, masking_utils

Signature = tuple[tuple[str, torch.dtype], ...]

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.fx.GraphModule]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8  # above 1, so export keeps both dimensions symbolic


def signature(inputs: Mapping[str, torch.Tensor]) -> Signature:
    return tuple(sorted((name, t.dtype) for name, t in inputs.items()))


SCORING: Signature = (("attention_mask", torch.long), ("input_ids", torch.long))  # the default scoring graph


@contextlib.contextmanager
def _scoring_config(model: nn.Module) -> Iterator[None]:
    """use_cache=False while exporting; set on the config, since as a kwarg it would become a graph input."""
    config = model.config
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


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")


@contextlib.contextmanager
def _without_hooks(model: nn.Module) -> Iterator[None]:
    """Hooks on the model (a LayerInjector's, say) stay out of the traced graph; they are put back after."""
    stash = []
    for module in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks:
                stash.append((hooks, dict(hooks)))
                hooks.clear()
    try:
        yield
    finally:
        for hooks, saved in stash:
            hooks.update(saved)


def example_inputs(model: nn.Module, sig: Signature) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    vocab = int(getattr(model.config.get_text_config(), "vocab_size", 2) or 2)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in sig:
        if name == "attention_mask":
            out[name] = torch.ones(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=dtype, device=device)
        elif name == "input_ids":
            out[name] = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=g).to(device, dtype)
        else:
            out[name] = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=dtype, device=device)
    return out


def export_scoring(model: nn.Module, sig: Signature) -> torch.fx.GraphModule:
    """A fresh export of the model for full-sequence scoring, batch and sequence dynamic."""
    inputs = example_inputs(model, sig)
    dims = {name: {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for name in inputs}
    with _scoring_config(model), torch.no_grad():
        program = torch.export.export(model, (), inputs, strict=False, dynamic_shapes=dims)
    return program.module()


class UnpaddedScoring(nn.Module):
    """The model on a batch without padding. It passes an empty cache and no mask, which lets transformers
    leave the attention mask out and call SDPA with `is_causal=True` (its fast causal kernels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids=input_ids, use_cache=False, **{cache_kwarg(self.model): DynamicCache()})
        return type(out)(logits=out.logits)  # the cache stays inside the graph


def cache_kwarg(model: nn.Module) -> str:
    """`cache` in recent transformers 5, `past_key_values` before it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def causal_path_possible(model: nn.Module) -> bool:
    """Whether an unpadded batch can skip the attention mask: a causal LM on SDPA with no sliding windows."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return (
        getattr(model, "can_generate", lambda: False)()
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and not sliding
        and all(kind == "full_attention" for kind in layer_types)
    )


@contextlib.contextmanager
def _mask_skipping_allowed() -> Iterator[None]:
    """transformers never skips the mask while exporting, since a shape-specialised `is_causal` could be wrong.
    The unpadded graph is exported only for q_length == kv_length with no padding, where it is right."""
    saved = masking_utils.is_torchdynamo_exporting
    masking_utils.is_torchdynamo_exporting = lambda: False
    try:
        yield
    finally:
        masking_utils.is_torchdynamo_exporting = saved


def export_unpadded(model: nn.Module) -> torch.fx.GraphModule:
    """The scoring graph for batches without padding (input_ids only; sequences of 2 tokens or more)."""
    inputs = example_inputs(model, (("input_ids", torch.long),))
    dims = {"input_ids": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}}
    with _mask_skipping_allowed(), torch.no_grad():
        program = torch.export.export(UnpaddedScoring(model), (), inputs, strict=False, dynamic_shapes=dims,
                                      prefer_deferred_runtime_asserts_over_guards=True)
    return program.module()


def cached_graph(model: nn.Module, kind: str, make: Callable[[], torch.fx.GraphModule]) -> torch.fx.GraphModule:
    """The model's graph of this kind (e.g. a scoring signature, "prefill", "decode"), made on first use,
    with any hooks on the model left out of it."""
    param = next(model.parameters())
    key = (kind, model.training, param.device, param.dtype)
    with _LOCK:
        per_model = _CACHE.setdefault(model, {})
        if key not in per_model:
            with _without_hooks(model):
                per_model[key] = make()
        return per_model[key]


def base_graph(model: nn.Module, sig: Signature) -> torch.fx.GraphModule:
    """The cached scoring graph of this model for this input signature, exported on first use."""
    return cached_graph(model, repr(sig), lambda: export_scoring(model, sig))


try:  # generates the graph's Python code on first call, so that re-compiling a spec costs no codegen
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover - older torch
    _LazyGraphModule = torch.fx.GraphModule


def materialize(gm: torch.fx.GraphModule) -> None:
    """Generate a lazily built GraphModule's Python code now."""
    if hasattr(gm, "real_recompile"):
        gm.real_recompile()


def copy_graph(base: torch.fx.GraphModule) -> torch.fx.Graph:
    """An independent copy of the base graph, keeping the exported module's pytree calling convention."""
    graph = torch.fx.Graph()
    graph._codegen = base.graph._codegen
    graph.output(graph.graph_copy(base.graph, {}))
    return graph


def _attr(root: nn.Module, target: str) -> object:
    for part in target.split("."):
        root = getattr(root, part)
    return root


def graph_module(base: torch.fx.GraphModule, graph: torch.fx.Graph, extra: dict[str, nn.Module]) -> torch.fx.GraphModule:
    """A GraphModule running `graph`, with the base's parameters (shared, not copied) and `extra` submodules."""
    owners: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            owners[target] = extra[target] if target in extra else _attr(base, target)
    gm = _LazyGraphModule(owners, graph, class_name=type(base).__name__)
    for attr in ("_in_spec", "_out_spec", "meta"):
        if hasattr(base, attr):
            setattr(gm, attr, getattr(base, attr))
    return gm
