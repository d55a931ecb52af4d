"""`garage.compile` and `garage.hook`: spec + model → the injected model, by graph rewrite or by hooks.

Both run the same front half (parse, resolve, build the op modules), so the two backends share op objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import nn

from . import spec as ast
from .archs import ModelInfo
from .build import BuildContext, build_op, capture_keys
from .diagnostics import Diagnostic, Problem, ResolveError, ValidationError, raise_if_errors
from .hooks import HookSet, attach
from .package import InjectedModel
from .parse import load, parse
from .resolve import Plan, resolve_collect

SpecLike = Union[ast.Spec, str, os.PathLike]


def as_spec(spec: SpecLike) -> ast.Spec:
    """A Spec from a Spec, spec text, or the path of a .garage file."""
    if isinstance(spec, ast.Spec):
        return spec
    if isinstance(spec, os.PathLike):
        return load(spec)
    if isinstance(spec, str):
        return parse(spec)
    raise TypeError(f"a spec is a garage.Spec, spec text or a path, not {type(spec).__name__}")


def spec_folder(spec: ast.Spec) -> Path | None:
    """The folder relative file paths in a spec are read from: the spec file's own, if it is a file."""
    path = Path(spec.filename)
    return path.parent if path.is_file() else None


@dataclass
class Prepared:
    plan: Plan
    modules: list[nn.Module]
    captures: dict[str, torch.Tensor]


def prepare(model: nn.Module, spec: SpecLike, bind: Mapping[str, object] | None = None) -> Prepared:
    """Parse, resolve and build the op modules (on the model's device and dtype). Raises GarageError."""
    spec = as_spec(spec)
    info = ModelInfo.from_model(model)
    plan, diagnostics = resolve_collect(spec, info)
    raise_if_errors(diagnostics, ResolveError)
    ctx = BuildContext(info.hidden_size, dict(bind or {}), spec_folder(spec))
    modules: list[nn.Module] = []
    problems: list[Diagnostic] = []
    failed: set[int] = set()
    for step, key in zip(plan, capture_keys(plan)):
        if step.statement in failed:
            continue
        try:
            modules.append(build_op(step, ctx, key))
        except Problem as problem:
            failed.add(step.statement)
            problems.append(problem.diagnostic(spec.source))
    raise_if_errors(problems, ValidationError)
    param = next(model.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else None
    for module in modules:
        module.to(device=param.device, dtype=dtype)
    return Prepared(plan, modules, ctx.captures)


def compile(
    model: nn.Module,
    spec: SpecLike,
    bind: Mapping[str, object] | None = None,
    compile: bool | dict = False,
) -> InjectedModel:
    """The model with the spec compiled in, as an fx graph rewrite. The model itself is never changed."""
    prepared = prepare(model, spec, bind)
    return InjectedModel(model, prepared.plan, prepared.modules, prepared.captures, compile=compile)


def hook(model: nn.Module, spec: SpecLike, bind: Mapping[str, object] | None = None) -> tuple[HookSet, Prepared]:
    """The hook backend: the spec applied to the eager model by forward hooks, until `.remove()`."""
    prepared = prepare(model, spec, bind)
    return attach(model, [s.site for s in prepared.plan], prepared.modules), prepared
