"""The front half of every backend: spec text or file → Spec → Plan → one op module per step.

Every problem found on the way is kept, stage by stage, so that `check` can report them all at once and
`compile` can raise them as the error type of the earliest stage that failed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import nn

from ..lang import spec as ast
from ..lang.diagnostics import (
    Diagnostic,
    GarageError,
    Problem,
    ResolveError,
    SpecError,
    ValidationError,
)
from ..lang.parse import parse_collect, parse_site, read_spec_file
from ..ops import placement
from .archs import ModelInfo
from .build_ops import BuildContext, at_site, build_op, capture_keys, gated
from .live import is_live, live_blade
from .resolve import ConcreteSite, Plan, concrete_sites, resolve_collect

SpecLike = Union[ast.Spec, str, "os.PathLike[str]"]


def sites_named(info: ModelInfo, text: str) -> list[ConcreteSite]:
    """The concrete sites a site written as text names: "h.6.mlp", "N-4", "h.*", "transformer.h.6",
    or any module path (quoted for the parser when it is not valid site syntax)."""
    site, source = parse_site(text)
    try:
        return concrete_sites(info, site)
    except Problem as problem:
        raise ResolveError([problem.diagnostic(source)]) from None


def spec_and_syntax(spec: SpecLike) -> tuple[ast.Spec, list[Diagnostic]]:
    """A spec and its syntax errors, keeping every statement that parsed (to report all problems at once).

    `spec` is a Spec, spec text, or a path (a PathLike, or a str naming a `.garage` file)."""
    if isinstance(spec, ast.Spec):
        return spec, []
    if isinstance(spec, os.PathLike):
        return parse_collect(read_spec_file(spec), os.fspath(spec))
    if isinstance(spec, str) and spec.endswith(".garage") and not any(c.isspace() for c in spec):
        return spec_and_syntax(Path(spec))  # a file name is never valid spec text: read the file
    if isinstance(spec, str):
        return parse_collect(spec)
    raise TypeError(f"a spec is a garage.Spec, spec text or a path, not {type(spec).__name__}")


def spec_folder(spec: ast.Spec) -> Path | None:
    """The folder relative file paths in a spec are read from: the spec file's own, if it is a file."""
    path = Path(spec.filename)
    return path.parent if path.is_file() else None


@dataclass
class Prepared:
    """The front half's result: the plan, one op module per step (None where building failed), and the
    diagnostics of each stage."""

    spec: ast.Spec
    plan: Plan
    modules: list[nn.Module | None]
    captures: dict[str, torch.Tensor]
    stages: dict[type[GarageError], list[Diagnostic]] = field(default_factory=dict)

    @property
    def diagnostics(self) -> list[Diagnostic]:
        return [d for ds in self.stages.values() for d in ds]

    def raise_if_errors(self, cause: BaseException | None = None) -> list[nn.Module]:
        """Raise every diagnostic at once, as the error type of the earliest stage that failed (chained to
        `cause`, the underlying error, when there is one); else the op modules, every one built."""
        for error_type, diags in self.stages.items():
            if any(d.is_error for d in diags):
                raise error_type(self.diagnostics) from cause
        return [m for m in self.modules if m is not None]


def _width_name(site: ConcreteSite) -> str:
    """What a site's last dimension is, in messages about vectors that do not fit it."""
    what = {"attn.heads": "head size", "router": "number of experts"}.get(site.kind, "width")
    return f"{site.label}'s {what}"


def model_info(model: nn.Module, filename: str) -> ModelInfo:
    """What garage reads of the model's structure; a model it cannot read (no config, blocks it cannot
    find, such as ALBERT's one shared block) is a diagnostic, not a TypeError from inside garage."""
    try:
        return ModelInfo.from_model(model)
    except TypeError as err:
        hint = None if "garage.ARCHS" in str(err) else "load it with transformers: garage reads its config"
        raise ResolveError([Diagnostic("error", f"garage cannot read this {type(model).__name__}: {err}", filename,
                                       hint=hint)]) from None


def prepare(model: nn.Module, spec: SpecLike, bind: Mapping[str, object] | None = None,
            at: tuple[torch.device, torch.dtype | None] | None = None) -> Prepared:
    """Parse, resolve and build every statement that can be, on the model's device and dtype, or on `at`
    (device, dtype) for a model that holds no values (a skeleton on the meta device, read for its shape)."""
    spec, syntax = spec_and_syntax(spec)
    info = model_info(model, spec.filename)
    plan, unresolved = resolve_collect(spec, info)
    device, dtype = at or placement(model)
    ctx = BuildContext(info.hidden_size, dict(bind or {}), spec_folder(spec), device=device, dtype=dtype)
    modules: list[nn.Module | None] = []
    unbuilt: list[Diagnostic] = []
    failed: set[int] = set()
    for step, key in zip(plan, capture_keys(plan)):
        module = None
        if step.statement not in failed:
            try:
                width = step.site.op_width
                here = ctx if width is None else replace(ctx, hidden=width, width_name=_width_name(step.site))
                built = at_site(live_blade(step, here, model, info), step.site) if is_live(step) else build_op(step, here, key)
                module = gated(built, step, ctx).to(device=device, dtype=dtype)
            except Problem as problem:
                failed.add(step.statement)
                unbuilt.append(problem.diagnostic(spec.source))
        modules.append(module)
    stages: dict[type[GarageError], list[Diagnostic]] = {SpecError: syntax, ResolveError: unresolved,
                                                         ValidationError: unbuilt}
    return Prepared(spec, plan, modules, ctx.captures, stages)
