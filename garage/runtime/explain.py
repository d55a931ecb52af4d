"""`explain`: where each statement of a spec landed, as records and as an aligned table."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import nn

from ..fx.locate import HiddenShape
from ..fx.rewrite import Rewritten
from ..lang import spec as ast
from ..lang.formatter import format_condition, format_op
from ..ops import innermost
from ..plan.resolve import Plan, Step

COLUMNS = ("line:col", "site", "module path", "shape", "fx node", "op")


def rows(plan: Plan, graph: Rewritten | None) -> list[dict[str, Any]]:
    """One record a statement and site: line, column, site, module path, shape, fx node, op. The fx nodes and
    the shape of the site's value are those of `graph`; without one (the spec runs by hooks) they are
    "(hook)" and "-"."""
    if graph is None:
        return [{"line": step.span.line, "column": step.span.column, "site": step.site.label,
                 "module_path": step.site.module_path, "shape": "-", "node": "(hook)", "op": _op(step)}
                for step in plan]
    nodes = {x.index: x.node for x in graph.inserted}
    values = {n.name: n.meta.get("val") for n in graph.graph_module.graph.nodes}
    graph_ = graph.graph_module.graph
    return [{"line": step.span.line, "column": step.span.column, "site": step.site.label,
             "module_path": step.site.module_path, "node": nodes.get(i, "-"), "op": _op(step),
             "shape": HiddenShape.of(graph_, plan.info.hidden_size, step.site.stack).describe(
                 values.get(nodes.get(i, "-")), step.site.head_count)}
            for i, step in enumerate(plan)]


def _op(step: Step) -> str:
    return format_op(step.op) + ("" if step.when is None else " " + format_condition(step.when.condition))


def sources(plan: Plan, ops: Sequence[nn.Module]) -> list[str]:
    """One line per live blade source: which of its blocks run in the graph; and one for the source input of
    patches, if any."""
    lines = []
    patched = [step.site for step in plan if isinstance(step.op, ast.Patch)]
    if patched:
        deepest = max((s.layer for s in patched if s.layer is not None), default=None)
        reach = "the whole model up to the final norm" if any(s.kind == "final" for s in patched) else (
            f"blocks 0..{deepest} of {plan.info.num_layers}" if deepest is not None else "the embeddings")
        lines.append(f"source input (source=): {len(patched)} patch site(s) read one source run of {reach} in this "
                     "graph, and not its later blocks or its head")
    for step, op in zip(plan, ops):
        live = getattr(innermost(op), "live", None)
        if live is not None:
            site, blocks = live.site, live.metadata.get("num_layers", "?")
            lines.append(f"{step.span.line}:{step.span.column} source {live.metadata.get('name', '')}: its "
                         f"{site.label} ({site.module_path}), so blocks 0..{site.layer} of {blocks} run in this "
                         f"graph, and not its later blocks or its head")
    return lines


def table(records: list[dict[str, Any]], notes: Iterable[str] = (), hooked: Iterable[str] = ()) -> str:
    """The records as an aligned table, then the notes (live sources), then a line per use run by hooks."""
    cells = [COLUMNS] + [(f"{r['line']}:{r['column']}", r["site"], r["module_path"], r["shape"], r["node"], r["op"])
                         for r in records]
    widths = [max(len(row[c]) for row in cells) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    lines += list(notes)
    lines += [f"{use}: by forward hooks on the eager model (garage cannot build its graph: see the warning)"
              for use in hooked]
    return "\n".join(lines)
