"""Plan steps → op modules. The same module objects serve the graph backend and the hook backend."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from . import ops
from . import spec as ast
from .diagnostics import Problem, did_you_mean
from .files import FileProblem, LoadedTensor, load_tensor
from .resolve import Plan, Step


@dataclass
class BuildContext:
    hidden: int
    bind: Mapping[str, object] = field(default_factory=dict)
    base_dir: str | os.PathLike | None = None
    captures: dict[str, torch.Tensor] = field(default_factory=dict)


def load_value(value: ast.Value, ctx: BuildContext, want: str = "tensor") -> LoadedTensor:
    """The tensor a VALUE names: a bound tensor, or a file loaded safely."""
    if isinstance(value, ast.BoundValue):
        if value.name not in ctx.bind:
            raise Problem(value.span, f"'{value.name}' is not bound", _bind_hint(value.name, ctx))
        bound = ctx.bind[value.name]
        if not isinstance(bound, torch.Tensor):
            raise Problem(value.span, f"'{value.name}' is bound to a {type(bound).__name__}, not a {want}", f"bind a {want}")
        return LoadedTensor(bound)
    try:
        return load_tensor(value.path, value.key, ctx.base_dir)
    except FileProblem as err:
        raise Problem(value.span, err.message, err.hint) from None


def _bind_hint(name: str, ctx: BuildContext) -> str:
    near = did_you_mean(name, [str(k) for k in ctx.bind])
    return near or f'pass it to garage: bind={{"{name}": ...}}'


def _module(op: ast.ModuleOp, ctx: BuildContext) -> nn.Module:
    if op.name in ctx.bind:
        bound = ctx.bind[op.name]
        if not isinstance(bound, nn.Module):
            raise Problem(op.span, f"'{op.name}' is bound to a {type(bound).__name__}, not an nn.Module", "bind a module")
        if op.kwargs:
            raise Problem(op.span, f"'{op.name}' is a bound module instance; it takes no arguments", f"write module {op.name}")
        return bound
    if op.name not in ops.REGISTRY:
        choices = list(ops.REGISTRY) + [str(k) for k in ctx.bind]
        hint = did_you_mean(op.name, choices) or f"built-in and registered modules: {', '.join(sorted(ops.REGISTRY))}; or bind one"
        raise Problem(op.span, f"unknown module '{op.name}'", hint)
    try:
        return ops.REGISTRY[op.name](**dict(op.kwargs))
    except TypeError as err:
        raise Problem(op.span, f"module {op.name} rejects its arguments: {err}", "check the argument names") from None


def _blade(op: ast.Blade, ctx: BuildContext) -> nn.Module:
    if op.source is None:
        return ops.chamber(ctx.hidden, op.method)
    if isinstance(op.source, ast.ModelSource):
        raise Problem(op.source.span, "a live source model (`from model`) is not supported yet",
                      "record the source's hidden state to a .safetensors file and use `from \"file\"`")
    if isinstance(op.source, ast.BoundValue) and isinstance(ctx.bind.get(op.source.name), nn.Module):
        source: nn.Module = ops.ModuleSource(ctx.bind[op.source.name])
    else:
        source = ops.TensorSource(load_value(op.source, ctx, "tensor or module").tensor, ctx.hidden, op.project)
    return ops.Blade(source, ctx.hidden, op.method, op.alpha)


_BUILDERS: dict[type, Callable[[ast.Op, BuildContext], nn.Module]] = {
    ast.Scale: lambda op, ctx: ops.Scale(op.factor),
    ast.Add: lambda op, ctx: ops.Add(load_value(op.value, ctx).tensor, 1.0 if op.factor is None else op.factor),
    ast.Ablate: lambda op, ctx: ops.Ablate(load_value(op.value, ctx).tensor),
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
        if not isinstance(step.op, ast.Capture):
            keys.append(None)
        elif per_statement[step.statement] == 1:
            keys.append(step.op.name)
        else:
            keys.append(f"{step.op.name}.{step.site.layer if step.site.layer is not None else step.site.module_path}")
    return keys


def build_op(step: Step, ctx: BuildContext, capture_key: str | None = None) -> nn.Module:
    """One op module for one step, wrapped to act at the step's token positions if it names any."""
    if isinstance(step.op, ast.Capture):
        module: nn.Module = ops.Capture(ctx.captures, capture_key or step.op.name)
    else:
        module = _BUILDERS[type(step.op)](step.op, ctx)
    if step.site.positions is not None:
        pos = step.site.positions
        module = ops.AtPositions(module, pos.kind, pos.start, pos.stop)
    return module
