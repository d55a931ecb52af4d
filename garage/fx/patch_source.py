"""`patch from source`: the model's own graph, run a second time on the source inputs, in the same graph.

The nodes that the patched sites' values depend on (the embeddings and the blocks up to the deepest patched
site) are copied from the base graph once, reading new graph inputs `source_<name>` in place of each input
`<name>` they read. Later blocks and the LM head are not copied, so the source run stops at the deepest
patch, and a patch at block 3 of 30 costs four blocks more, not thirty. The copies name the same parameters
as the originals, so they share them. One more input, `patch_weight` ([batch or 1, patches, seq or 1, heads
or 1]), carries each patch's per-token weight: patch k (in plan order) reads `patch_weight[:, k]`.
"""

from __future__ import annotations

import functools
import operator
from typing import Sequence

from torch import nn
from torch.fx import Graph, GraphModule, Node

from .._compat import with_more_kwargs
from ..ops import Patch, innermost
from .rewrite import Splicer, stack_input

SOURCE_INPUT = "source_{}"
WEIGHT_INPUT = "patch_weight"


def patch_indices(modules: Sequence[nn.Module]) -> list[int]:
    """The op indices of patches, in plan order (the order of their weights in `patch_weight`)."""
    return [i for i, m in enumerate(modules) if isinstance(innermost(m), Patch)]


def needed(nodes: Sequence[Node]) -> set[Node]:
    """These nodes and every node they depend on."""
    seen, todo = set(nodes), list(nodes)
    while todo:
        for node in todo.pop().all_input_nodes:
            if node not in seen:
                seen.add(node)
                todo.append(node)
    return seen


def splice(graph: Graph, base: GraphModule, sites: dict[int, tuple[str, str]]
           ) -> tuple[dict[int, tuple[Node, ...]], dict[str, object]]:
    """Copy the nodes the sites (op index → (base node name, stack)) need into `graph`, reading the source
    inputs; what each patch op reads after h: (the source's value, the mask of the site's stack, the source's
    mask, its weight)."""
    base_nodes = {n.name: n for n in base.graph.nodes}
    keep = needed([base_nodes[name] for name, _stack in sites.values()])
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in inputs}
    copies: dict[Node, Node] = {}
    added: list[str] = []
    anchor = inputs[-1]
    for node in base.graph.nodes:
        if node.op != "placeholder" or (node not in keep and not node.name.endswith("attention_mask")):
            continue
        name = SOURCE_INPUT.format(node.name)
        with graph.inserting_after(anchor):
            copies[node] = anchor = graph.placeholder(name)
        anchor.meta = dict(node.meta)
        added.append(name)
    with graph.inserting_after(anchor):
        weight = anchor = graph.placeholder(WEIGHT_INPUT)
    added.append(WEIGHT_INPUT)
    with_more_kwargs(graph, added)
    for node in base.graph.nodes:
        if node in keep and node.op not in ("placeholder", "output"):
            with graph.inserting_after(anchor):
                copies[node] = anchor = graph.node_copy(node, lambda n: copies[n])
    values: dict[int, tuple[Node, ...]] = {}
    for slot, (i, (name, stack)) in enumerate(sorted(sites.items())):
        mask = stack_input("attention_mask", stack) or ""
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (weight, (slice(None), slot)))
        values[i] = (copies[base_nodes[name]], by_name[mask], copies[base_nodes[mask]], anchor)
    return values, {}


def splicer(base: GraphModule, sites: dict[int, tuple[str, str]]) -> Splicer | None:
    """What `rewrite.inject` needs to run the patches' source inputs in the graph (None: no patches)."""
    return functools.partial(splice, base=base, sites=sites) if sites else None


__all__ = ["SOURCE_INPUT", "WEIGHT_INPUT", "needed", "patch_indices", "splice", "splicer"]
