"""`garage.check`: every problem in a spec, found before any real tensor is computed, reported at once.

Static checks (syntax, sites, expectations, bindings, files, the Same-Dimension rule, dtypes) happen while
the plan is resolved and its ops are built (`garage.plan.prepare`). Here come the checks that need the
traced graph: user modules run on fake tensors, the rewritten graph is checked with networkx, and the
lints add their warnings. `validate` also returns the injected graph it checked, so that `compile` does
not build it twice; the public `Report` carries diagnostics only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import nn

from ..fx import store
from ..fx.export import TraceFailure
from ..fx.fuse import injected
from ..fx.kinds import GraphKind
from ..fx.locate import HiddenShape, SiteNotFound
from ..fx.rewrite import Rewritten, site_location
from ..fx.store import trace_diagnostic
from ..lang import spec as ast
from ..lang.diagnostics import Diagnostic, Problem, Severity, ValidationError, render
from ..plan.prepare import Prepared, SpecLike, prepare
from .lints import (
    Finding,
    blade_findings,
    dead_op_findings,
    dedupe,
    graph_findings,
    sae_findings,
    vector_findings,
)
from .shapes import check_module, user_module


@dataclass(frozen=True)
class Report:
    """The outcome of a check: `.errors`, `.warnings`, and a `str()` that renders them all."""

    diagnostics: list[Diagnostic]

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if not d.is_error]

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        return render(self.diagnostics)


@dataclass(frozen=True)
class Validated:
    """What validation found, and the injected graphs it checked, by kind (none when it could not build one)."""

    report: Report
    graphs: dict[GraphKind, Rewritten]
    cause: BaseException | None = None  # why the model could not be traced, kept for the raised error


def _diagnostic(prepared: Prepared, finding: Finding) -> Diagnostic:
    severity: Severity = "warning" if finding.rule else "error"
    return prepared.spec.source.diagnostic(finding.step.span, finding.message, finding.hint, severity, finding.rule)


GraphChecks = tuple[list[Diagnostic], dict[GraphKind, Rewritten], BaseException | None]


def _graph_checks(model: nn.Module, prepared: Prepared) -> GraphChecks:
    """Shape checks of user modules on fake values, then networkx checks of the rewritten graph (returned too).

    A causal LM is checked on its generation step graph (see `fx.store.checked_graph`), anything else on
    its scoring graph; both hold every site, so the findings are the same."""
    plan, source = prepared.plan, prepared.spec.source
    try:
        patches = any(isinstance(step.op, ast.Patch) for step in plan)  # they run on forward calls only
        checked = store.checked_graph(model, source.filename, scoring=patches)
    except TraceFailure as failure:  # a wrapper's forward would run under hooks too: refused
        return [trace_diagnostic(failure, source.filename)], {}, failure
    out: list[Diagnostic] = [checked.warning] if checked.warning else []
    if checked.kind is None or checked.value is None:  # not the spec's fault: it runs by hooks, unchecked in a graph
        return out, {}, None
    kind, base = checked.kind, checked.value
    hidden = plan.info.hidden_size
    nodes = {n.name: n for n in base.graph.nodes}
    for step, module in zip(plan, prepared.modules):
        try:
            location = site_location(base, step.site, hidden, kind.prefix)
        except SiteNotFound as err:
            out.append(source.diagnostic(step.span, f"{step.site.label}: {err}", "name another site"))
            continue
        if step.when is not None:  # a condition's site is wired into the graph too
            try:
                site_location(base, step.when.site, hidden, kind.prefix)
            except SiteNotFound as err:
                out.append(source.diagnostic(step.when.condition.site.span, f"{step.when.site.label}: {err}",
                                             "read the condition at another site"))
                continue
        part = user_module(module) if module is not None else None
        if part is None:
            continue
        try:
            names = HiddenShape.of(base.graph, step.site.width or hidden, step.site.stack)
            value = nodes[location.node].meta["val"]
            if location.permutation is not None:  # the op sees a transposed model's states as [batch, seq, hidden]
                value = value.permute(location.permutation)
            check_module(part[0], part[1], value, names, step.op.span, part[2])
        except Problem as problem:
            out.append(problem.diagnostic(source))
    out = list(dict.fromkeys(out))  # a statement over many layers reports the same problem once
    modules = [m for m in prepared.modules if m is not None]
    if any(d.is_error for d in out) or len(modules) != len(prepared.modules):
        return out, {}, None
    try:
        rewritten = injected(kind, base, [s.site for s in plan], modules, hidden)
    except (SiteNotFound, TraceFailure) as err:  # a live blade's source model: the target's sites are placed above
        return out + [Diagnostic("error", f"cannot place a live blade source model in the graph: {err}",
                                 source.filename, hint="take the blade from a file (garage blade extract)")], {}, None
    findings = graph_findings(rewritten.graph_module, plan, {x.index: x.node for x in rewritten.inserted})
    return out + [_diagnostic(prepared, f) for f in dedupe(findings)], {kind: rewritten}, None


def validate(model: nn.Module, prepared: Prepared) -> Validated:
    """Add the graph checks and lints to what preparing found; every diagnostic, and the checked graph."""
    found, graphs, cause = _graph_checks(model, prepared) if prepared.plan.steps else ([], {}, None)
    plan, modules = prepared.plan, prepared.modules
    lints = dedupe(iter([*dead_op_findings(plan), *blade_findings(plan, modules), *vector_findings(plan, modules),
                         *sae_findings(plan, modules)]))
    found += [_diagnostic(prepared, f) for f in lints]
    prepared.stages.setdefault(ValidationError, []).extend(found)
    diagnostics = sorted(prepared.diagnostics, key=lambda d: (d.line, d.column, not d.is_error))
    return Validated(Report(diagnostics), graphs, cause)


def check(model: nn.Module, spec: SpecLike, bind: Mapping[str, object] | None = None) -> Report:
    """Every error and warning in `spec` against `model`, without running the model on real data."""
    return validate(model, prepare(model, spec, bind)).report
