"""`garage.compile` and `garage.hook`: spec + model → the injected model, by graph rewrite or by hooks.

Both run the same front half (parse, resolve, build the op modules: `garage.plan.prepare`), so the two
backends share op objects, and both refuse a spec with errors. `compile` also runs the graph checks, and
hands the injected graph they built to the InjectedModel, so it is not built twice.
"""

from __future__ import annotations

import os
import warnings
from typing import Mapping

from torch import nn

from .check.validate import validate
from .lang.diagnostics import GarageWarning, ValidationError
from .plan.prepare import Prepared, SpecLike, prepare
from .runtime.hook_backend import graph_only
from .runtime.compiled import CompileSetting, compile_options
from .runtime.hooks import HookSet, attach
from .runtime.injected import InjectedModel
from .runtime.params import load as load_params


def compile(
    model: nn.Module,
    spec: SpecLike,
    bind: Mapping[str, object] | None = None,
    compile: CompileSetting = False,
    params: str | os.PathLike[str] | None = None,
) -> InjectedModel:
    """The model with the spec compiled in, as an fx graph rewrite. The model itself is never changed.

    The spec is checked first (see `garage.check`): errors raise, warnings are kept on `.warnings`.
    `compile=True` runs the injected graphs under torch.compile; a mode name ("reduce-overhead": CUDA graphs
    for each decoded token) or a dict of torch.compile options says how.
    `params` is a file of learned parameters (`inj.save_params`, `garage train`) for this spec.
    """
    compile_options(compile)  # a bad mode is said before any tracing
    prepared = prepare(model, spec, bind)
    validated = validate(model, prepared)
    modules = prepared.raise_if_errors(validated.cause)
    for warning in validated.report.warnings:
        warnings.warn(warning.render(), GarageWarning, stacklevel=2)
    injected = InjectedModel(model, prepared.plan, modules, prepared.captures, compile=compile,
                             warnings=validated.report.warnings, graphs=validated.graphs)
    if params is not None:
        problems = load_params(prepared.plan, modules, params)
        if problems:
            raise ValidationError(problems)
    return injected


def hook(model: nn.Module, spec: SpecLike, bind: Mapping[str, object] | None = None) -> tuple[HookSet, Prepared]:
    """The hook backend: the spec applied to the eager model by forward hooks, until `.remove()`.

    A live source blade, a patch and a condition are refused here (`graph_only`): hooks would see only the
    target's new tokens in a cached decode step, with no source run and no other site's value."""
    prepared = prepare(model, spec, bind)
    modules = prepared.raise_if_errors()
    refused = graph_only(prepared.plan, modules)
    if refused is not None:
        span, what, hint = refused
        raise ValidationError([prepared.spec.source.diagnostic(
            span, f"{what} runs in garage.compile only, not under hooks: it reads values only the injected graph "
            "holds", hint)])
    return attach(model, [s.site for s in prepared.plan], modules), prepared
