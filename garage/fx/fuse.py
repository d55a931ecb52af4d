"""Live blade sources fused into the target's injected graph: one graph runs both models.

For each blade `from model …`, the source model's base graph of the same kind (scoring, unpadded or the
generation step) is exported (and cached) like the target's. The nodes its site value depends on, and
only those, are copied into the target's graph: the source's embeddings and its blocks up to layer K.
Its later blocks and its LM head are never copied, so they do not run. The copies read the target's own
inputs (the token ids, mask, positions, …). In the step graph the source also keeps its own KV cache:
its buffers become extra graph inputs, after the target's, in the same tuple, so the decode loop
allocates and passes them like the target's. The source's parameters are the source model's own tensors,
shared, not copied.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Sequence, cast

from torch import nn
from torch.fx import Graph, GraphModule, Node

from .._compat import with_more_inputs
from ..ops import Conditional, innermost
from ..plan.resolve import ConcreteSite
from . import patch_source, store
from .kinds import GraphKind, Step
from .patch_source import needed as depends
from .rewrite import Rewritten, Splicer, attribute, inject, site_location, stack_input
from .steps import STEP_ARGS

SOURCE_PREFIX = "garage_source_"


@dataclass(frozen=True)
class SourceGraph:
    """A live source's base graph of one kind, the node of its site value, and how many of its leading
    inputs it shares with the target (the rest are its own cache buffers)."""

    base: GraphModule
    node: str
    shared_inputs: int | None  # None: all of them


def live_sources(modules: Sequence[nn.Module], kind: GraphKind) -> dict[int, SourceGraph]:
    """The source graph of each op that is a live blade, by op index (none for other ops)."""
    found: dict[int, SourceGraph] = {}
    for i, module in enumerate(modules):
        live = getattr(innermost(module), "live", None)
        if live is None:
            continue
        base = store.graph(live.model, kind)
        node = site_location(base, live.site, live.width, kind.prefix).node
        found[i] = SourceGraph(base, node, STEP_ARGS if isinstance(kind, Step) else None)
    return found


def splice(graph: Graph, sources: Mapping[int, SourceGraph]) -> tuple[dict[int, tuple[Node, ...]], dict[str, object]]:
    """Copy each source's needed nodes into `graph`, right after its inputs; the site value of each op
    index in the target graph, and the source tensors the copies read (by their new attribute names)."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in inputs}
    values: dict[int, tuple[Node, ...]] = {}
    owners: dict[str, object] = {}
    own: list[Node] = []  # the sources' own inputs (cache buffers), added after the target's
    anchor = inputs[-1]
    for i, source in sources.items():
        nodes = {n.name: n for n in source.base.graph.nodes}
        needed = depends([nodes[source.node]])
        placeholders = [n for n in source.base.graph.nodes if n.op == "placeholder"]
        shared = len(placeholders) if source.shared_inputs is None else source.shared_inputs
        copies: dict[Node, Node] = {}
        for j, node in enumerate(placeholders):
            if j < shared:
                copies[node] = by_name[node.name]
            elif node in needed:
                with graph.inserting_after(own[-1] if own else inputs[-1]):
                    copies[node] = graph.placeholder(f"source{i}_{node.name}")
                copies[node].meta = dict(node.meta)
                own.append(copies[node])
        anchor = own[-1] if own else anchor
        prefix = f"{SOURCE_PREFIX}{i}."
        for node in source.base.graph.nodes:
            if node not in needed or node.op in ("placeholder", "output"):
                continue
            with graph.inserting_after(anchor):
                copy = graph.node_copy(node, lambda n: copies[n])
            if node.op in ("get_attr", "call_module"):
                copy.target = prefix + str(node.target)
                owners[copy.target] = attribute(source.base, str(node.target))
            copies[node] = anchor = copy
        values[i] = (copies[nodes[source.node]],)
    if own:
        with_more_inputs(graph, len(own))
    return values, owners


def splicer(modules: Sequence[nn.Module], kind: GraphKind) -> Splicer | None:
    """What `rewrite.inject` needs to fuse the live sources among `modules` into a graph of this kind."""
    sources = live_sources(modules, kind)
    return functools.partial(splice, sources=sources) if sources else None


def _both(first: Splicer | None, second: Splicer | None) -> Splicer | None:
    """One splicer that runs both (either may be None)."""
    if first is None or second is None:
        return first or second

    def spliced(graph: Graph) -> tuple[dict[int, tuple[Node, ...]], dict[str, object]]:
        (values, owners), (more_values, more_owners) = first(graph), second(graph)
        return {**values, **more_values}, {**owners, **more_owners}
    return spliced


def conditions(base: GraphModule, modules: Sequence[nn.Module], hidden: int, prefix: str) -> Splicer | None:
    """What a conditional op reads after h: its condition site's value (as the model computed it there,
    before any op at that site) and the graph's attention mask (None in a graph without one)."""
    sites = {i: cast(ConcreteSite, m.site) for i, m in enumerate(modules) if isinstance(m, Conditional)}
    where = {i: site_location(base, site, hidden, prefix).node for i, site in sites.items()}
    if not where:
        return None

    def spliced(graph: Graph) -> tuple[dict[int, tuple[Node, ...]], dict[str, object]]:
        nodes = {n.name: n for n in graph.nodes}
        masks = {i: nodes.get(stack_input("attention_mask", site.stack) or "") for i, site in sites.items()}
        return {i: (nodes[name], masks[i]) for i, name in where.items()}, {}  # type: ignore[misc]
    return spliced


def injected(kind: GraphKind, base: GraphModule, sites: Sequence[ConcreteSite], modules: Sequence[nn.Module],
             hidden: int) -> Rewritten:
    """`base`, a graph of this kind, with `modules[i]` applied at `sites[i]`, and any live blade sources
    and patches' source runs among them fused in, and conditions' sites wired to their ops."""
    patched = {i: (site_location(base, sites[i], hidden, kind.prefix).node, sites[i].stack)
               for i in patch_source.patch_indices(modules)}
    both = _both(_both(splicer(modules, kind), patch_source.splicer(base, patched)), conditions(base, modules, hidden, kind.prefix))
    return inject(base, sites, modules, hidden, kind.prefix, kind.position_inputs, both)


__all__ = ["SOURCE_PREFIX", "SourceGraph", "injected", "live_sources", "splice", "splicer"]
