"""Find the fx node that holds each site's hidden state, using the `nn_module_stack` that export records.

A module's output is the single [batch, seq, hidden] value (or flat [batch*seq, hidden], as OPT's MLP
gives) computed inside the module's scope and used outside it (of several, the one that depends on all
the others). A block's input is the single such value
computed outside the block and used inside it. A router's logits are the first value of [tokens,
experts] computed inside the router. A site found zero or several times is an error naming the site,
never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from ..plan.resolve import ConcreteSite


class SiteNotFound(Exception):
    pass


def scope_of(node: Node) -> tuple[str, ...]:
    """The module paths whose forward computed this node, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return tuple(path for path, _type in stack.values())


def in_scope(node: Node, path: str) -> bool:
    """Whether the module at `path`, or one inside it, computed this node (SqueezeBERT's blocks are missing from
    the stacks export records, while their sublayers are there)."""
    inside = path + "."
    return any(p == path or p.startswith(inside) for p in scope_of(node))


# The inputs whose [batch, seq] a stack's hidden states have, in order of preference: an encoder–decoder
# model's decoder reads its own ids (or, when none are given, a shift of the source's).
STACK_INPUTS = {"decoder": ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds"),
                "encoder": ("input_ids", "inputs_embeds", "input_features"), "": ("input_ids", "inputs_embeds")}
ANY = "*"  # a sequence length that any value matches: a speech encoder's, fixed by its convolutions


@dataclass(frozen=True)
class HiddenShape:
    """The symbolic sizes of batch, sequence and hidden, read from the graph's `input_ids` (or the input of
    the stack named: an encoder–decoder model's decoder positions are the target's tokens)."""

    batch: str
    seq: str
    hidden: int

    @classmethod
    def of(cls, graph: Graph, hidden: int, stack: str = "") -> "HiddenShape":
        inputs = {node.name: node.meta["val"].shape for node in graph.nodes
                  if node.op == "placeholder" and node.name in STACK_INPUTS[stack] and "val" in node.meta}
        for name in STACK_INPUTS[stack]:
            if name in inputs:
                shape = inputs[name]
                return cls(str(shape[0]), ANY if name == "input_features" else str(shape[1]), hidden)
        raise SiteNotFound("the graph has no input_ids placeholder")

    def matches(self, node: Node) -> bool:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() not in (2, 3):
            return False
        if not isinstance(val.shape[-1], int) or val.shape[-1] != self.hidden:  # a symbolic width is never hidden,
            return False  # and comparing a data-dependent one would raise (mvp's, trocr's)
        dims = tuple(str(d) for d in val.shape[:-1])
        if self.seq == ANY:
            return len(dims) == 2 and dims[0] == self.batch
        return dims == (self.batch, self.seq) or (len(dims) == 1 and dims[0] in self.flat)

    def transposed(self, node: Node) -> tuple[int, int, int] | None:
        """The permutation that makes a value laid out [seq, batch, hidden] (XLNet's) or [batch, hidden, seq]
        (SqueezeBERT's convolutions) into [batch, seq, hidden]; None for any other value. Each is its own
        inverse, so the same permutation turns it back."""
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 3 or self.seq == ANY:
            return None
        dims = tuple(str(d) for d in val.shape)
        hidden = str(self.hidden)
        layouts: dict[tuple[str, ...], tuple[int, int, int]] = {(self.seq, self.batch, hidden): (1, 0, 2),
                                                                 (self.batch, hidden, self.seq): (0, 2, 1)}
        return layouts.get(dims)

    @property
    def flat(self) -> set[str]:
        """How batch*seq prints: OPT flattens to [batch*seq, hidden], and sympy may print the product either
        way round; in a graph traced for one shape (garage's static fallback) it is a number."""
        if self.seq == "1":
            return {self.batch}
        if self.batch.isdigit() and self.seq.isdigit():
            return {str(int(self.batch) * int(self.seq))}
        return {f"{self.batch}*{self.seq}", f"{self.seq}*{self.batch}"}


    def describe(self, value: object, heads: int = 0) -> str:
        """A value's shape in words: `[batch, seq, 576]`, `[batch*seq, 576]` for a flattened one, and
        `[batch, seq, 9×64]` for one split into 9 heads; "-" for what is not a tensor."""
        if not isinstance(value, torch.Tensor):
            return "-"
        names = {**{flat: "batch*seq" for flat in self.flat}, self.batch: "batch", self.seq: "seq"}
        dims = [names.get(str(d), str(d)) for d in value.shape]
        if heads:
            dims[-1] = f"{heads}×{int(value.shape[-1]) // heads}"
        return "[" + ", ".join(dims) + "]"


def _ancestors(node: Node) -> set[Node]:
    seen: set[Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _downstream_of_the_rest(found: list[Node]) -> list[Node]:
    """Of several outputs, the one that depends on all the others, if there is one: a module's output
    depends on everything it computed, while a value it only passes through (such as a norm's no-op cast
    of its input, which the residual add reads too) does not depend on the output."""
    for node in found:
        before = _ancestors(node)
        if all(other in before for other in found if other is not node):
            return [node]
    return found


def _call(node: Node, path: str) -> str:
    """Which call of the module at `path` computed this node: export keys a module's second call `…@1`."""
    stack = node.meta.get("nn_module_stack") or {}
    return next((key for key, (p, _type) in stack.items() if p == path), "")


def _candidates(graph: Graph, path: str, shape: HiddenShape, inside: bool, transposed: bool = False
                ) -> dict[str, list[Node]]:
    """The values that qualify as the module's output (made inside, used outside) or input (made outside, used
    inside), per call of the module, in the order the calls run; `transposed`: values of a transposed layout."""
    calls: dict[str, list[Node]] = {}
    for n in graph.nodes:
        fits = shape.transposed(n) is not None if transposed else shape.matches(n)
        if n.op in ("get_attr", "output") or not fits or in_scope(n, path) != inside:
            continue
        if inside:
            if any(not in_scope(u, path) for u in n.users):
                calls.setdefault(_call(n, path), []).append(n)
        else:
            for call in dict.fromkeys(_call(u, path) for u in n.users if in_scope(u, path)):
                calls.setdefault(call, []).append(n)
    # a module's output depends on everything it computed: of several, the one downstream of the rest
    return {call: _downstream_of_the_rest(found) if inside else found for call, found in calls.items()}


def _from_previous_block(found: list[Node], block: str) -> list[Node]:
    """Of several values entering a block, the one the block before it computed: its residual stream, where a
    block also reads another (NeoMME's blocks read the embeddings again, beside the stream)."""
    blocks, _, index = block.rpartition(".")
    if len(found) < 2 or not index.isdigit() or index == "0":
        return found
    previous = [n for n in found if in_scope(n, f"{blocks}.{int(index) - 1}")]
    return previous if len(previous) == 1 else found


Found = tuple[Node, list[Node], "tuple[int, int, int] | None"]  # value, users to redirect, permutation to [B, T, H]


def locate_calls(graph: Graph, site: ConcreteSite, shape: HiddenShape, prefix: str = "") -> list[Found]:
    """The node holding the site's value and the users that must see the injected value instead, for each call
    of the site's module, in order: one for almost every module, and more where a model calls one module
    twice (nanochat's final norm also normalises the embeddings), where a hook would act at each call. A
    model that keeps its hidden states transposed ([seq, batch, hidden] or [batch, hidden, seq]) has them
    found by that shape when no [batch, seq, hidden] value qualifies, with the permutation that turns them
    into [batch, seq, hidden], so that ops see positions where they expect them.

    `prefix` is where the model sits in the exported module ("model." for the generation steps). `shape`
    gives the site's last dimension (the hidden size, or the site's own width, as for `mlp.hidden`).
    """
    path = prefix + site.module_path
    if site.kind == "router":  # the logits: the first value the router computes, read inside and out
        found = [n for n in graph.nodes if n.op != "get_attr" and in_scope(n, path) and shape.matches(n)][:1]
        if not found:
            raise SiteNotFound(f"cannot find the router logits of {site.module_path} in the traced graph: "
                               f"no [batch*seq, {shape.hidden}] value is computed inside it")
        return [(found[0], list(found[0].users), None)]
    inside = not site.is_input
    calls = _candidates(graph, path, shape, inside)
    transposed = not calls and bool(calls := _candidates(graph, path, shape, inside, transposed=True))
    if site.kind == "in":
        calls = {call: _from_previous_block(found, path) for call, found in calls.items()}
    if not calls or any(len(found) != 1 for found in calls.values()):
        what = "output" if inside else "input"
        names = ", ".join(n.name for found in calls.values() for n in found) or "none"
        count = sum(len(found) for found in calls.values())
        raise SiteNotFound(
            f"cannot find the {what} of {site.module_path} in the traced graph: "
            f"{count} [batch, seq, {shape.hidden}] values qualify ({names})"
        )
    return [(found[0], [u for u in found[0].users if in_scope(u, path) != inside],
             shape.transposed(found[0]) if transposed else None) for found in calls.values()]
