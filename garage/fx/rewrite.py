"""Base graph + located sites + op modules → injected GraphModule (ops inserted as call_module nodes).

Sites are located once per base graph and remembered by node name, so rewriting a second spec on the
same model costs a graph copy and a recompile, not a search. Ops at one site run in file order; sites run
in the order the model computes them.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from .._compat import copy_graph, graph_module_like
from ..ops import takes_positions
from ..plan.resolve import ConcreteSite
from .locate import HiddenShape, locate_calls

OP_PREFIX = "garage_op_"


@dataclass(frozen=True)
class Location:
    """Where a site lives in a base graph, by node name: its value, the users to redirect, its order. A module
    the model calls more than once has its earlier calls' places too (`earlier`): ops act at each, as a hook
    would."""

    node: str
    users: tuple[str, ...]
    order: int
    earlier: tuple["Location", ...] = ()
    permutation: tuple[int, int, int] | None = None  # a transposed value's way to and from [batch, seq, hidden]

    @property
    def calls(self) -> tuple["Location", ...]:
        return (*self.earlier, self)


_LOCATIONS: "weakref.WeakKeyDictionary[GraphModule, dict[tuple[str, str], Location]]" = weakref.WeakKeyDictionary()


def site_location(base: GraphModule, site: ConcreteSite, hidden: int, prefix: str = "") -> Location:
    """The location of a site in a base graph, found once and remembered."""
    known = _LOCATIONS.setdefault(base, {})
    if site.key not in known:
        order = {n.name: i for i, n in enumerate(base.graph.nodes)}
        shape = HiddenShape.of(base.graph, site.width or hidden, site.stack)
        # A block's input is the previous block's output: its ops come after that block's ops.
        calls = [Location(node.name, tuple(u.name for u in users), 2 * order[node.name] + (site.kind == "in"),
                          permutation=perm) for node, users, perm in locate_calls(base.graph, site, shape, prefix)]
        known[site.key] = dataclasses.replace(calls[-1], earlier=tuple(calls[:-1]))
    return known[site.key]


@dataclass(frozen=True)
class Inserted:
    """One op module placed in the injected graph, for explain()."""

    index: int
    node: str


class Rewritten(NamedTuple):
    """An injected graph, and where each op went."""

    graph_module: GraphModule
    inserted: list[Inserted]


POSITION_INPUTS = ("attention_mask", "prompt_length", "position_ids", "input_ids")


def stack_input(name: str | None, stack: str) -> str | None:
    """The graph input that plays `name`'s part for a site of this stack: a decoder's positions are the
    target's, so its ops read `decoder_attention_mask` and `decoder_input_ids` (and none of the source's)."""
    return f"decoder_{name}" if stack == "decoder" and name else name


def attribute(root: nn.Module, target: str) -> object:
    """The submodule, parameter or buffer at a dotted path."""
    for part in target.split("."):
        root = getattr(root, part)
    return root


def graph_module(base: GraphModule, graph: Graph, extra: dict[str, object]) -> GraphModule:
    """A GraphModule running `graph`, with the base's parameters (shared, not copied) and `extra` submodules."""
    owners: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            owners[target] = extra[target] if target in extra else attribute(base, target)
    return graph_module_like(base, owners, graph)


# Adds other graphs' nodes to a graph (`fx.fuse.splice`, `fx.patch_source.splice`): the values each op index
# reads after h, and the tensors the added nodes read, by attribute name.
Splicer = Callable[[Graph], tuple[dict[int, tuple[Node, ...]], dict[str, object]]]


def inject(
    base: GraphModule,
    sites: Sequence[ConcreteSite],
    modules: Sequence[nn.Module],
    hidden: int,
    prefix: str = "",
    position_inputs: Sequence[str | None] = POSITION_INPUTS,
    splicer: Splicer | None = None,
) -> Rewritten:
    """A copy of `base` with `modules[i]` applied at `sites[i]`. `base` itself is not changed.

    Position-limited ops also receive the graph inputs named in `position_inputs` (None, or a name the
    graph lacks, passes None): the attention mask, in generation graphs the prompt lengths and the
    position ids, and the input ids (whose shape gives batch and sequence for flattened values).
    Live blades receive their source's state, and patches their source run's values, from the nodes
    `splicer` adds.
    """
    locations = [site_location(base, site, hidden, prefix) for site in sites]
    graph = copy_graph(base)
    sourced, submodules = splicer(graph) if splicer is not None else ({}, {})
    nodes = {n.name: n for n in graph.nodes}

    def position_args(stack: str) -> tuple[Node | None, ...]:
        return tuple(nodes.get(name) if (name := stack_input(each, stack)) else None for each in position_inputs)
    seen: dict[tuple[str, str], Node] = {}  # (site node, user) → the value that user currently reads
    inserted: list[Inserted] = []

    # Group ops by site, keeping file order inside a site; visit sites in compute order.
    by_site: dict[tuple[str, str], list[int]] = {}
    for i, site in enumerate(sites):
        by_site.setdefault(site.key, []).append(i)
    placements = [(loc, key) for key, ops in by_site.items() for loc in locations[ops[0]].calls]
    for loc, key in sorted(placements, key=lambda placed: placed[0].order):
        origin = nodes[loc.node]
        users = [nodes[u] for u in loc.users]
        current = seen.get((loc.node, loc.users[0]), origin)
        value = current
        if loc.permutation is not None:  # ops see [batch, seq, hidden]; the model gets its own layout back
            value = _permuted(graph, value, loc.permutation)
        for i in by_site[key]:
            name = f"{OP_PREFIX}{i}"
            submodules[name] = modules[i]
            extra = position_args(sites[i].stack) if takes_positions(modules[i]) else ()
            if i in sourced:
                extra = (*sourced[i], *extra)
            with graph.inserting_after(value):
                new = graph.call_module(name, (value, *extra))
            new.meta["val"] = value.meta.get("val")
            value = new
            inserted.append(Inserted(i, new.name))
        if loc.permutation is not None:
            value = _permuted(graph, value, loc.permutation)
        for user in users:
            user.replace_input_with(current, value)
            seen[(loc.node, user.name)] = value
    graph.lint()
    return Rewritten(graph_module(base, graph, submodules), sorted(inserted, key=lambda x: x.index))


def _permuted(graph: Graph, value: Node, permutation: tuple[int, int, int]) -> Node:
    """A node after `value` that permutes its dimensions (a view: the same permutation undoes it)."""
    with graph.inserting_after(value):
        node = graph.call_function(torch.permute, (value, permutation))
    val = value.meta.get("val")
    node.meta["val"] = val.permute(permutation) if isinstance(val, torch.Tensor) else None
    return node


__all__ = ["POSITION_INPUTS", "stack_input", "Inserted", "Location", "Rewritten", "Splicer", "attribute", "inject", "site_location"]
