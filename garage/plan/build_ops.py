"""Plan steps → op modules. The same module objects serve the graph backend and the hook backend."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .. import ops
from ..lang import spec as ast
from ..lang.diagnostics import Problem, Span, did_you_mean
from ..sae import SAE, SaeProblem, load_sae
from .files import FileProblem, LoadedTensor, load_tensor, resolve_path
from .resolve import ConcreteSite, Plan, Step


@dataclass
class BuildContext:
    hidden: int
    bind: Mapping[str, object] = field(default_factory=dict)
    base_dir: str | os.PathLike[str] | None = None
    captures: dict[str, torch.Tensor] = field(default_factory=dict)
    device: torch.device | None = None  # where the model's parameters live, and their dtype
    dtype: torch.dtype | None = None
    width_name: str = "this model's hidden size"  # what `hidden` is, in messages (a site's own width)


def _owned(module: nn.Module, span: Span, name: str, ctx: BuildContext) -> nn.Module:
    """A bound module as the op uses it: the user's own object where it already sits on the model's device
    and dtype, else a copy moved there, so that garage never changes what it is handed."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_meta for t in tensors):
        raise Problem(span, f"module '{name}' has parameters on the meta device: it holds no values",
                      "load its weights (e.g. with load_state_dict(..., assign=True)) before binding it")
    moves = any((ctx.device is not None and t.device != ctx.device)
                or (ctx.dtype is not None and t.is_floating_point() and t.dtype != ctx.dtype) for t in tensors)
    return copy.deepcopy(module) if moves else module


def load_value(value: ast.Value, ctx: BuildContext, want: str = "tensor") -> LoadedTensor:
    """The tensor a VALUE names: a bound tensor, or a file loaded safely."""
    if isinstance(value, ast.BoundValue):
        if value.name not in ctx.bind:
            raise Problem(value.span, f"'{value.name}' is not bound", bind_hint(value.name, ctx))
        bound = ctx.bind[value.name]
        if not isinstance(bound, torch.Tensor):
            raise Problem(value.span, f"'{value.name}' is bound to a {type(bound).__name__}, not a {want}", f"bind a {want}")
        return LoadedTensor(bound)
    try:
        return load_tensor(value.path, value.key, ctx.base_dir)
    except FileProblem as err:
        raise Problem(value.span, err.message, err.hint) from None


def bind_hint(name: str, ctx: BuildContext) -> str:
    near = did_you_mean(name, [str(k) for k in ctx.bind])
    return near or f'pass it to garage: bind={{"{name}": ...}}'


def _float_tensor(tensor: torch.Tensor, value: ast.Value) -> torch.Tensor:
    """A dense floating tensor with values: sparse layouts are densified, 8-bit floats (which few ops
    support) are up-cast; meta and non-float tensors are refused at the value's span."""
    if tensor.is_meta:
        raise Problem(value.span, f"{_shown(value)} is on the meta device: it holds no values",
                      "bind or save a tensor with real values")
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if not tensor.is_floating_point():
        raise Problem(value.span, f"{_shown(value)} holds {str(tensor.dtype).replace('torch.', '')} values, not floating point",
                      "convert it with .float() before saving or binding it")
    return tensor.float() if tensor.element_size() < 2 else tensor


def recorded_hidden(loaded: LoadedTensor) -> int | None:
    """The hidden size of the model a file's tensor was made on, when its metadata records one."""
    recorded = loaded.metadata.get("hidden_size", "")
    return int(recorded) if recorded.isdigit() else None


def _shown(value: ast.Value) -> str:
    return f"'{value.name}'" if isinstance(value, ast.BoundValue) else value.path


def vector(value: ast.Value, ctx: BuildContext) -> tuple[torch.Tensor, dict[str, str]]:
    """A [hidden] vector for add/ablate, checked against the model's hidden size (the Same-Dimension rule),
    and the metadata its file records (a steering vector's provenance, read by the lints)."""
    loaded = load_value(value, ctx)
    tensor = _float_tensor(loaded.tensor, value)
    recorded = recorded_hidden(loaded)
    if recorded is not None and recorded != ctx.hidden:
        raise Problem(value.span, f"{_shown(value)} was made on a model of hidden size {recorded}, but this "
                      f"model's is {ctx.hidden}", "make the vector on this model (garage vector --model …)")
    if tensor.numel() != ctx.hidden:
        raise Problem(
            value.span,
            f"{_shown(value)} has {tensor.numel()} values {list(tensor.shape)} but {ctx.width_name} is {ctx.hidden}",
            f"use a [{ctx.hidden}] vector (the Same-Dimension rule), or a blade with `project topk` or `project linear`",
        )
    return tensor.reshape(ctx.hidden), loaded.metadata


def blade_tensor(source: ast.Value, project: str | None, ctx: BuildContext) -> tuple[torch.Tensor, dict[str, str]]:
    """A recorded blade, checked for width against the model (or the projection that makes it fit)."""
    loaded = load_value(source, ctx, "tensor or module")
    tensor = _float_tensor(loaded.tensor, source)
    rows = [size for size in tensor.shape[:-1] if size != 1]
    if tensor.dim() == 0 or len(rows) > 1:
        raise Problem(source.span, f"blade {_shown(source)} has shape {list(tensor.shape)}; a blade is one vector "
                      "[hidden] or one sequence [length, hidden]",
                      "save the source's hidden state at one layer: its mean over tokens, or one row a position")
    tensor = tensor.reshape(*rows, tensor.shape[-1])  # [hidden], or [length, hidden] for a sequence blade
    width = tensor.shape[-1]
    recorded = recorded_hidden(loaded)
    if project is None and (width != ctx.hidden or (recorded is not None and recorded != ctx.hidden)):
        source_width = width if recorded is None else recorded
        raise Problem(
            source.span,
            f"blade {_shown(source)} comes from a source with hidden size {source_width}, but this model's is {ctx.hidden}",
            "source and target must share hidden dimensions (the Same-Dimension rule): add `project topk` or `project linear`",
        )
    if project == "topk" and width < ctx.hidden:
        raise Problem(source.span, f"`project topk` cannot widen a blade of width {width} to {ctx.hidden}",
                      "use `project linear`")
    return tensor, loaded.metadata


def _module(op: ast.ModuleOp, ctx: BuildContext) -> nn.Module:
    if op.name in ctx.bind:
        bound = ctx.bind[op.name]
        if not isinstance(bound, nn.Module):
            raise Problem(op.span, f"'{op.name}' is bound to a {type(bound).__name__}, not an nn.Module", "bind a module")
        if op.kwargs:
            raise Problem(op.span, f"'{op.name}' is a bound module instance; it takes no arguments", f"write module {op.name}")
        return _owned(bound, op.span, op.name, ctx)
    if op.name not in ops.REGISTRY:
        choices = list(ops.REGISTRY) + [str(k) for k in ctx.bind]
        hint = did_you_mean(op.name, choices) or f"built-in and registered modules: {', '.join(sorted(ops.REGISTRY))}; or bind one"
        raise Problem(op.span, f"unknown module '{op.name}'", hint)
    try:
        return ops.REGISTRY[op.name](**dict(op.kwargs))
    except Exception as err:  # a user class's constructor: whatever it raises is about the spec's arguments
        raise Problem(op.span, f"module {op.name} rejects its arguments: {type(err).__name__}: {err}",
                      "check the argument names and values") from None


def _blade(op: ast.Blade, ctx: BuildContext) -> nn.Module:
    if op.source is None:
        return ops.chamber(ctx.hidden, op.method)
    assert not isinstance(op.source, ast.ModelSource)  # built by plan.live, which needs the target model
    assert op.method is not None  # the grammar requires a method before `from`
    bound = ctx.bind.get(op.source.name) if isinstance(op.source, ast.BoundValue) else None
    if isinstance(bound, nn.Module):
        assert isinstance(op.source, ast.BoundValue)
        source: nn.Module = ops.ModuleSource(_owned(bound, op.source.span, op.source.name, ctx))
    else:
        tensor, metadata = blade_tensor(op.source, op.project, ctx)
        source = ops.TensorSource(tensor, ctx.hidden, op.project, metadata)
    return ops.Blade(source, ctx.hidden, op.method, op.alpha)


def _ablate(op: ast.Ablate, ctx: BuildContext) -> nn.Module:
    direction, metadata = vector(op.value, ctx)
    if not direction.abs().sum() > 0:
        raise Problem(op.value.span, f"{_shown(op.value)} is a zero vector: it has no direction to ablate",
                      "give a non-zero direction")
    return ops.Ablate(direction, metadata)


# Each builder takes its own AST node type (the key); `Any` because a dict cannot say so per entry.
_BUILDERS: dict[type, Callable[[Any, BuildContext], nn.Module]] = {
    ast.Scale: lambda op, ctx: ops.Scale(op.factor),
    ast.Add: lambda op, ctx: ops.Add(*vector(op.value, ctx), factor=1.0 if op.factor is None else op.factor),
    ast.Learn: lambda op, ctx: ops.Add(*(vector(op.init, ctx) if op.init is not None else (torch.zeros(ctx.hidden), {})),
                                       factor=1.0 if op.factor is None else op.factor, learn=True),
    ast.Ablate: lambda op, ctx: _ablate(op, ctx),
    ast.Zero: lambda op, ctx: ops.Zero(),
    ast.Clamp: lambda op, ctx: ops.Clamp(op.low, op.high),
    ast.Noise: lambda op, ctx: ops.Noise(op.std, op.always),
    ast.ModuleOp: _module,
    ast.Blade: _blade,
    ast.Debate: lambda op, ctx: ops.Debate(ctx.hidden, op.method, op.views, op.strength),
}


def capture_keys(plan: Plan) -> list[str | None]:
    """The `.captures` key of each step: the name, or `name.LAYER` when one statement names several sites."""
    per_statement: dict[int, int] = {}
    for step in plan:
        per_statement[step.statement] = per_statement.get(step.statement, 0) + 1
    keys: list[str | None] = []
    for step in plan:
        name = ast.capture_name(step.op)
        if name is None or per_statement[step.statement] == 1:
            keys.append(name)
        else:
            keys.append(f"{name}.{step.site.layer if step.site.layer is not None else step.site.module_path}")
    return keys


def _experts(op: ast.Bias | ast.Mask | ast.Force, step: Step, ctx: BuildContext) -> tuple[int, ...]:
    """The experts a router op names, checked against the router's expert count (ctx.hidden at a router site)."""
    if step.site.kind != "router":
        raise Problem(op.span, f"`{op.keyword}` acts on router logits, and {step.site.label} is not a router",
                      "write it at an MoE block's router: at h.I.router " + op.keyword + " …")
    named = (op.expert,) if isinstance(op, ast.Force) else op.experts if isinstance(op.experts, tuple) else ()
    if named and max(named) >= ctx.hidden:
        raise Problem(op.span, f"expert {max(named)} is out of range: this router scores {ctx.hidden} experts "
                      f"(0..{ctx.hidden - 1})", f"choose experts in 0..{ctx.hidden - 1}")
    return named


def _router_op(op: ast.Bias | ast.Mask | ast.Force, step: Step, ctx: BuildContext) -> nn.Module:
    named = _experts(op, step, ctx)
    if isinstance(op, ast.Force):
        return ops.MaskExperts(ctx.hidden, tuple(e for e in range(ctx.hidden) if e != op.expert))
    if isinstance(op, ast.Mask):
        if len(named) == ctx.hidden:
            raise Problem(op.span, f"this masks all {ctx.hidden} experts: no token could be routed",
                          "leave at least one expert unmasked, or use `force K` to route every token to expert K")
        return ops.MaskExperts(ctx.hidden, named)
    factor = 1.0 if op.factor is None else op.factor
    if isinstance(op.experts, tuple):
        profile = torch.zeros(ctx.hidden)
        profile[list(named)] = 1.0
        return ops.Add(profile, {}, factor)
    return ops.Add(*vector(op.experts, ctx), factor=factor)


def _patch(op: ast.Patch, site: ConcreteSite) -> nn.Module:
    """A patch picks its own tokens and heads, since it reads the source's value at matching ones."""
    pos = site.positions
    if pos is not None and pos.kind == "new":
        raise Problem(op.span, "`patch` pairs tokens of two inputs, and the source has no generated tokens",
                      "patch at [last], [prompt], [i] or [a:b], or at every token (no brackets)")
    heads = site.head_count if site.kind == "attn.heads" else 0
    mix = 1.0 if op.mix is None else op.mix
    if pos is None or pos.kind == "prompt":
        return ops.Patch(mix, heads=heads, chosen=site.heads)
    return ops.Patch(mix, pos.kind, pos.start, pos.stop, heads, site.heads)


def _sae(op: ast.SaeFeatures | ast.SaeCapture, site: ConcreteSite, ctx: BuildContext) -> SAE:
    """The SAE an `sae` statement names (a folder read safely, or a bound SAE), checked against the site: its
    d_in must be the site's width, and every feature one it has."""
    if site.kind in ("attn.heads", "router"):
        raise Problem(op.span, f"an SAE reads a site's whole state, and {site.label} is "
                      + ("split into heads" if site.kind == "attn.heads" else "a router's logits"),
                      "write it at h.I, h.I.in, h.I.attn, h.I.mlp or h.I.mlp.hidden")
    value = op.value
    if isinstance(value, ast.BoundValue):
        if value.name not in ctx.bind:
            raise Problem(value.span, f"'{value.name}' is not bound", bind_hint(value.name, ctx))
        bound = ctx.bind[value.name]
        if not isinstance(bound, SAE):
            raise Problem(value.span, f"'{value.name}' is bound to a {type(bound).__name__}, not an SAE",
                          "bind garage.sae.load_sae(folder), or write the SAE's folder in quotes")
        sae = _owned(bound, value.span, value.name, ctx)
        assert isinstance(sae, SAE)
        shown = f"SAE '{value.name}'" + (f" ({sae.source})" if sae.source else "")
    else:
        path = value.path + (f"#{value.key}" if value.key else "")  # a folder's name may hold a '#'
        try:
            sae = load_sae(resolve_path(path, ctx.base_dir), path)
        except (FileProblem, SaeProblem) as err:
            raise Problem(value.span, err.message, err.hint) from None
        shown = f"SAE {path}"
    if sae.d_in != ctx.hidden:
        raise Problem(value.span, f"{shown} has d_in {sae.d_in}, but {ctx.width_name} is {ctx.hidden}",
                      "use an SAE trained on this site of this model (its cfg.json's hook_name names the site)")
    if isinstance(op, ast.SaeFeatures) and op.features[-1] >= sae.d_sae:
        raise Problem(op.span_of(op.features[-1]), f"feature {op.features[-1]} is out of range: {shown} has "
                      f"{sae.d_sae} features (0..{sae.d_sae - 1})", f"choose features in 0..{sae.d_sae - 1}")
    return sae


def build_op(step: Step, ctx: BuildContext, capture_key: str | None = None) -> nn.Module:
    """One op module for one step, wrapped to act on the site's chosen heads and token positions."""
    if isinstance(step.op, ast.Patch):
        return _patch(step.op, step.site)
    if isinstance(step.op, ast.SaeFeatures):
        module: nn.Module = ops.SaeFeatures(_sae(step.op, step.site, ctx), step.op.features, step.op.action,
                                            step.op.amount)
    elif isinstance(step.op, ast.SaeCapture):
        module = ops.SaeCapture(ctx.captures, capture_key or step.op.name, _sae(step.op, step.site, ctx))
    elif isinstance(step.op, ast.Capture):
        module = ops.Capture(ctx.captures, capture_key or step.op.name)
    elif isinstance(step.op, ast.ROUTER_OPS):
        module = _router_op(step.op, step, ctx)
    else:
        module = _BUILDERS[type(step.op)](step.op, ctx)
    if step.site.kind == "attn.heads" and ops.takes_positions(module):
        raise Problem(step.op.span, "a sequence blade cannot be added at attention heads",
                      "add it at a block, attn or mlp site, or use a one-vector blade")
    return at_site(module, step.site)


def gated(module: nn.Module, step: Step, ctx: BuildContext) -> nn.Module:
    """The op under its statement's condition (`when …`), if it has one; ctx.hidden is the model's width."""
    if step.when is None:
        return module
    condition = step.when.condition
    if ast.capture_name(step.op) is not None or isinstance(step.op, ast.Patch):
        raise Problem(condition.span, f"`{step.op.keyword}` takes no condition: a condition chooses the rows an op "
                      "changes", "put the condition on an op that changes h (add, scale, ablate, …)")
    if getattr(ops.innermost(module), "live", None) is not None:
        raise Problem(condition.span, "a blade from a live source takes no condition", "take the blade from a file")
    direction, _ = vector(condition.value, ctx)
    if not direction.abs().sum() > 0:
        raise Problem(condition.value.span, f"{_shown(condition.value)} is a zero vector: a condition needs a direction",
                      "give a non-zero condition vector")
    return ops.Conditional(module, direction, step.when.site, condition.compare, condition.threshold, condition.soft)


def at_site(module: nn.Module, site: ConcreteSite) -> nn.Module:
    """An op wrapped to act on the site's chosen heads, and at its token positions."""
    if site.kind == "attn.heads":
        module = ops.Heads(module, site.head_count, site.heads)
    if site.positions is not None:
        pos = site.positions
        module = ops.AtPositions(module, pos.kind, pos.start, pos.stop)
    return module
