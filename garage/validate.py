"""`garage.check`: every problem in a spec, found before any real tensor is computed, reported at once.

Static checks (syntax, sites, expectations, bindings, files, the Same-Dimension rule, dtypes) happen while
the plan is resolved and its ops are built. Here come the checks that need the traced graph: user modules
run on fake tensors, the rewritten graph is checked with networkx, and the lints add their warnings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from torch import nn
from torch.fx import GraphModule

from .compiler import Prepared, SpecLike, prepare
from .diagnostics import Diagnostic, Problem, ValidationError, render
from .lints import Finding, blade_findings, dead_op_findings, dedupe, graph_findings
from .locate import HiddenShape, SiteNotFound
from .rewrite import Inserted, inject, site_location
from .shapes import check_module, user_module
from .trace import SCORING, base_graph



@dataclass
class Report:
    """The outcome of a check: `.errors`, `.warnings`, and a `str()` that renders them all."""

    diagnostics: list[Diagnostic]
    injected: tuple[GraphModule, list[Inserted]] | None = field(default=None, repr=False)  # the checked graph

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


def _diagnostic(prepared: Prepared, finding: Finding) -> Diagnostic:
    severity = "warning" if finding.rule else "error"
    return prepared.spec.source.diagnostic(finding.step.span, finding.message, finding.hint, severity, finding.rule)


def _graph_checks(model: nn.Module, prepared: Prepared) -> tuple[list[Diagnostic], tuple | None]:
    """Shape checks of user modules on fake values, then networkx checks of the rewritten graph (returned too)."""
    plan, source = prepared.plan, prepared.spec.source
    try:
        base = base_graph(model, SCORING)
    except Exception as err:  # the model's own code failed to export: not the spec's fault, but it must be said
        return [Diagnostic("error", f"cannot trace this model with torch.export: {type(err).__name__}: {err}",
                           source.filename, hint="check that the model runs on input_ids and attention_mask")], None
    hidden = plan.info.hidden_size
    names = HiddenShape.of(base.graph, hidden)
    nodes = {n.name: n for n in base.graph.nodes}
    out: list[Diagnostic] = []
    for step, module in zip(plan, prepared.modules):
        try:
            location = site_location(base, step.site, hidden)
        except SiteNotFound as err:
            out.append(source.diagnostic(step.span, f"{step.site.label}: {err}", "name another site"))
            continue
        part = user_module(module) if module is not None else None
        if part is None:
            continue
        try:
            check_module(part[0], part[1], nodes[location.node].meta["val"], names, step.op.span)
        except Problem as problem:
            out.append(problem.diagnostic(source))
    if out or any(m is None for m in prepared.modules):
        return out, None
    gm, inserted = inject(base, [s.site for s in plan], list(prepared.modules), hidden)
    findings = graph_findings(gm, plan, {x.index: x.node for x in inserted})
    return out + [_diagnostic(prepared, f) for f in dedupe(findings)], (gm, inserted)


def validate(model: nn.Module, prepared: Prepared) -> Report:
    """Add the graph checks and lints to what preparing found; return every diagnostic."""
    found, injected = _graph_checks(model, prepared) if prepared.plan.steps else ([], None)
    lints = dedupe(iter([*dead_op_findings(prepared.plan), *blade_findings(prepared.plan, prepared.modules)]))
    found += [_diagnostic(prepared, f) for f in lints]
    prepared.stages.setdefault(ValidationError, []).extend(found)
    return Report(sorted(prepared.diagnostics, key=lambda d: (d.line, d.column, not d.is_error)), injected)


def check(model: nn.Module, spec: SpecLike, bind: Mapping[str, object] | None = None) -> Report:
    """Every error and warning in `spec` against `model`, without running the model on real data."""
    return validate(model, prepare(model, spec, bind))
