"""An exported graph's input guards as data, so a cached graph checks its inputs exactly as torch would.

`torch.export(...).module()` checks each call's input sizes in a `_guards_fn` that torch writes as Python
source and `exec`s: equalities between sizes, static sizes, the `>= min` / `<= max` ranges of dynamic
sizes, and relations such as `(a*b) % c == 0`. A cached graph must not run code, so when a graph is
dumped each guard's source (which this process made) is parsed into a small expression tree, stored as
JSON; when it is loaded the trees are checked node by node and run by `evaluate`, an interpreter of
sizes, integers and arithmetic only. The messages are torch's: `Guard failed: input_ids.size()[1] >= 4`.

The guard source's form (`L['name'].size()[d]`, sympy's `Max`/`Min`, or Python's `max`/`min` on torch 2.11,
Python arithmetic) and `torch._assert`, which keeps a failed guard an AssertionError under torch.compile too,
were checked on torch 2.11.0, 2.13.0 and 2.14.1; a
guard this module cannot read makes the graph uncacheable (exported each time), never wrong.

May import: torch only.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any, Callable, Sequence

import torch
from torch import nn

Expr = Any  # int | list: ["size" | "stride", input, dim] or [operator, *operands]

_BINARY: dict[type, str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%",
                            ast.Pow: "**", ast.Div: "/"}
_COMPARE: dict[type, str] = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_CALLS = {"Max": "max", "Min": "min", "max": "max", "min": "min", "math.floor": "floor", "math.ceil": "ceil", "floor": "floor",
          "ceiling": "ceil", "abs": "abs"}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod,
    "**": operator.pow, "/": operator.truediv, "==": operator.eq, "!=": operator.ne, "<": operator.lt,
    "<=": operator.le, ">": operator.gt, ">=": operator.ge, "not": operator.not_, "neg": operator.neg,
    "and": lambda *xs: all(xs), "or": lambda *xs: any(xs), "max": max, "min": min, "floor": math.floor,
    "ceil": math.ceil, "abs": abs,
}
_ARITY = {"not": 1, "neg": 1, "floor": 1, "ceil": 1, "abs": 1}


class GuardSyntax(ValueError):
    """A guard this module cannot express, or a stored tree that is not one it wrote."""


def parse(code: str, inputs: dict[str, int]) -> Expr:
    """The tree of one guard of torch's, e.g. `L['input_ids'].size()[1] == L['attention_mask'].size()[1]`;
    `inputs` maps each placeholder's path (`L['past'][3]`) to its position."""
    return _convert(ast.parse(code, mode="eval").body, inputs)


def _convert(node: ast.AST, inputs: dict[str, int]) -> Expr:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):  # bools are ints
        return int(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return [_BINARY[type(node.op)], _convert(node.left, inputs), _convert(node.right, inputs)]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        return ["not" if isinstance(node.op, ast.Not) else "neg", _convert(node.operand, inputs)]
    if isinstance(node, ast.BoolOp):
        return ["and" if isinstance(node.op, ast.And) else "or", *(_convert(v, inputs) for v in node.values)]
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        sides = [_convert(x, inputs) for x in (node.left, *node.comparators)]
        pairs = [[_COMPARE[type(op)], a, b] for op, a, b in zip(node.ops, sides, sides[1:])]
        return pairs[0] if len(pairs) == 1 else ["and", *pairs]
    if isinstance(node, ast.Call) and not node.keywords and ast.unparse(node.func) in _CALLS:
        return [_CALLS[ast.unparse(node.func)], *(_convert(a, inputs) for a in node.args)]
    if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)
            and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr in ("size", "stride") and not node.value.args
            and ast.unparse(node.value.func.value) in inputs):
        return [node.value.func.attr, inputs[ast.unparse(node.value.func.value)], node.slice.value]
    raise GuardSyntax(f"a guard garage cannot store: {ast.unparse(node)}")


def check(tree: Any, inputs: int) -> Expr:
    """`tree` itself when it is a tree `parse` can make over `inputs` flat inputs; else GuardSyntax."""
    if type(tree) is int:
        return tree
    if not isinstance(tree, list) or not tree or not isinstance(tree[0], str):
        raise GuardSyntax(f"not a guard expression: {tree!r}")
    head, *rest = tree
    if head in ("size", "stride"):
        if len(rest) != 2 or not all(type(x) is int for x in rest) or not 0 <= rest[0] < inputs or rest[1] < 0:
            raise GuardSyntax(f"not an input size: {tree!r}")
        return tree
    if head not in _FUNCTIONS or not rest or (head in _ARITY and len(rest) != _ARITY[head]):
        raise GuardSyntax(f"not a guard operator: {head!r}")
    for operand in rest:
        check(operand, inputs)
    return tree


def evaluate(tree: Expr, args: Sequence[torch.Tensor]) -> Any:
    """The value of a checked tree on these inputs (their sizes and strides only)."""
    if type(tree) is int:
        return tree
    head = tree[0]
    if head == "size":
        return args[tree[1]].size()[tree[2]]
    if head == "stride":
        return args[tree[1]].stride()[tree[2]]
    return _FUNCTIONS[head](*(evaluate(x, args) for x in tree[1:]))


def message(code: str) -> str:
    """torch's message for a guard: its source, with `L['name']` read as `name`."""
    return "Guard failed: " + re.sub(r"L\['([A-Za-z_][A-Za-z0-9_]*)'\]", r"\1", code)


class InputGuards(nn.Module):
    """Checks that a call's inputs satisfy the exported graph's guards: the rebuilt form of its `_guards_fn`.

    Each check is (tree, message); a failed one raises torch's AssertionError, `Guard failed: …`."""

    def __init__(self, checks: list[tuple[Expr, str]]) -> None:
        super().__init__()
        self.checks = [(tree, str(text)) for tree, text in checks]
        self._is_impure = True  # a call with no users, kept by dead-code elimination like torch's

    def forward(self, *args: torch.Tensor) -> None:
        for tree, text in self.checks:
            torch._assert(bool(evaluate(tree, args)), text)
