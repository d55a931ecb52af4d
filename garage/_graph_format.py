"""A fast, safe on-disk form of the GraphModules that `torch.export(...).module()` produces.

Exporting a 30-layer model takes 4-8 s a graph; loading this form takes 0.1-0.4 s. torch's own
serializer (`torch.export.save`) is no faster to load (it parses every symbolic size with sympy and
rebuilds a fake tensor per node), stores the weights, and falls back to `torch.load(weights_only=False)`.
Like `_compat`, this module uses private torch APIs (fake tensors, the ShapeEnv, the pytree codegen,
`_LazyGraphModule`); it was checked on torch 2.13.0, and a cached graph records the torch version that
wrote it and is never read by another. A change in any of these internals fails tests/test_graph_cache.py.

May import: torch, sympy (a torch dependency), safetensors and `garage._guards` only.

`dump(gm, root)` turns a graph into plain JSON data plus the few tensors that are not the live model's own
(lifted constants); the model's parameters and buffers are recorded by their path in `root` only.
`load(desc, tensors, root)` rebuilds an equivalent GraphModule over `root`'s live tensors (shared, not
copied). The cache seals its entries (`garage._cache`), and independently of that, nothing in a
description can run code:
- every call target is resolved through an explicit allowlist: torch.ops overloads of the `aten` and
  `prims` namespaces (public names only), a few higher-order ops that run the graph's own subgraphs, and
  the size arithmetic torch.export emits (`operator.getitem`, `operator.add`, …, `math.ceil`, `torch.sym_*`,
  `torch._assert`), with no `getattr`, no `operator.call`, no dunders;
- every string fx pastes into the code it generates (inputs, node names, keyword arguments, the input
  spec's keys, attribute paths, the class name) must be a plain identifier, and inputs take no defaults;
- symbolic sizes are rebuilt from JSON trees of allowlisted sympy classes, not parsed;
- the exported module's `_guards_fn`, code that torch writes and `exec`s, is rebuilt from guard trees
  that `garage._guards` interprets, so a cached graph refuses exactly the inputs a fresh export refuses.

Node names, `nn_module_stack`, and `meta["val"]` (FakeTensors, SymInts and SymBools with the original
symbolic sizes, in one fresh FakeTensorMode and ShapeEnv) are restored. Not restored: `stack_trace`,
`from_node`, `torch_fn`, `custom`, `tensor_meta` (none is read by garage, and dynamo re-traces the code).
"""

from __future__ import annotations

import json
import keyword
import math
import operator
import os
from collections.abc import Callable
from typing import Any

import sympy
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

from . import _guards
from ._guards import InputGuards

FORMAT = 1
OP_NAMESPACES = frozenset({"aten", "prims"})  # torch.ops namespaces a cached graph may call


GUARD_SOURCE = "garage_source"  # on an exported module's `_guards_fn`: the (code, paths) torch generated it from


class Unsupported(Exception):
    """The graph holds something this format cannot store safely; export again instead of caching."""


class CacheMismatch(Exception):
    """The cached graph does not fit this root (a parameter is missing or has another shape or dtype)."""


# ------------------------------------------------------------------ call targets
# The plain Python functions a cached graph may call: the size arithmetic and assertions torch.export
# emits, and nothing that reaches attributes, globals or arbitrary callables (no getattr, no operator.call).
_OPERATORS = ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne",
              "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")
_MATH = ("ceil", "floor", "trunc", "sqrt", "log2")
_SYM = ("sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite", "sym_sqrt", "sym_sum")
# Higher-order ops that only run the graph's own subgraphs.
_HOPS = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast", "wrap", "cond", "while_loop", "scan",
                   "map_impl", "invoke_subgraph", "associative_scan"})


def _python_targets() -> dict[str, Callable[..., Any]]:
    """Every plain Python callable a cached graph may call, by a stable name."""
    from torch.amp import autocast_mode

    table: dict[str, Callable[..., Any]] = {f"operator.{n}": getattr(operator, n) for n in _OPERATORS}
    table.update({f"math.{n}": getattr(math, n) for n in _MATH})
    table.update({f"torch.{n}": getattr(torch, n) for n in _SYM if hasattr(torch, n)})
    table["torch._assert"] = torch._assert
    table["torch._C._set_grad_enabled"] = torch._C._set_grad_enabled
    for name in ("_enter_autocast", "_exit_autocast"):
        if hasattr(autocast_mode, name):
            table[f"torch.amp.autocast_mode.{name}"] = getattr(autocast_mode, name)
    return table


_PY_TARGETS = _python_targets()
_PY_NAMES = {id(fn): name for name, fn in reversed(list(_PY_TARGETS.items()))}  # first name wins (operator.eq)


def _encode_target(target: Any) -> Any:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        qualified = target.name() if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
        if qualified.partition("::")[0] not in OP_NAMESPACES:  # e.g. transformers' own kernels: not loadable
            raise Unsupported(f"op {qualified} is outside the namespaces a cached graph may call")
        return {"op" if isinstance(target, torch._ops.OpOverload) else "packet": qualified}  # "aten::add.Tensor"
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() not in _HOPS:
            raise Unsupported(f"higher-order op {target.name()} is not in the allowlist")
        return {"hop": target.name()}
    name = _PY_NAMES.get(id(target))
    if name is None or _PY_TARGETS[name] is not target:
        raise Unsupported(f"call target {target!r} is not in the allowlist")
    return {"py": name}


def _op_name(name: Any) -> str:
    """A name looked up on a torch.ops namespace: an identifier (aten has dunder ops such as `__and__`; what
    the lookup finds must then be that very operator, so the namespace object's own attributes are refused)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise Unsupported(f"name {name!r}")
    return name


def _decode_target(enc: Any) -> Any:
    if not isinstance(enc, dict) or len(enc) != 1:
        raise Unsupported(f"call target {enc!r}")
    ((tag, value),) = enc.items()
    if tag in ("op", "packet") and isinstance(value, str):
        namespace, _, rest = value.partition("::")
        if namespace not in OP_NAMESPACES:
            raise Unsupported(f"op namespace {namespace!r} is not allowed")
        name, _, overload = rest.partition(".")
        try:
            packet = getattr(getattr(torch.ops, namespace), _op_name(name))
        except (AttributeError, RuntimeError):  # no such operator
            packet = None
        if not isinstance(packet, torch._ops.OpOverloadPacket) or packet._qualified_op_name != f"{namespace}::{name}":
            raise Unsupported(f"{value} is not an operator")
        if tag == "packet":
            return packet
        overload = overload or "default"
        op = getattr(packet, _op_name(overload), None)
        if not isinstance(op, torch._ops.OpOverload) or op._overloadname != overload:
            raise Unsupported(f"{value} is not an operator overload")
        return op
    if tag == "hop" and value in _HOPS:
        hop = torch._ops._higher_order_ops.get(value)
        if isinstance(hop, torch._ops.HigherOrderOperator):
            return hop
    if tag == "py" and value in _PY_TARGETS:
        return _PY_TARGETS[value]
    raise Unsupported(f"call target {enc} is not in the allowlist")


# ------------------------------------------------------------------ symbolic expressions
def _sympy_classes() -> dict[str, type]:
    from torch.utils._sympy import functions as F

    names = ("Add", "Mul", "Pow", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "LessThan",
             "StrictGreaterThan", "GreaterThan", "Unequality", "Equality", "And", "Or", "Not", "Abs")
    table = {n: getattr(sympy, n) for n in names}
    for n in ("FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
              "FloorToInt", "CeilDiv", "LShift", "RShift", "Max", "Min", "PowByNatural", "FloatPow",
              "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
              "ToFloat", "Identity"):
        if hasattr(F, n):
            table[n] = getattr(F, n)
    return table


_SYMPY = _sympy_classes()


def _encode_expr(expr: Any) -> Any:
    """A sympy expression as a JSON tree: ints, ["S", name], ["Q", p, q], ["F", repr], [class, *args]."""
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        return ["S", expr.name]
    if isinstance(expr, sympy.Rational):
        return ["Q", int(expr.p), int(expr.q)]
    if isinstance(expr, sympy.Float):
        return ["F", repr(float(expr))]
    if expr is sympy.true or expr is sympy.false:
        return ["B", bool(expr)]
    if expr in (sympy.oo, -sympy.oo) or type(expr).__name__ in ("IntInfinity", "NegativeIntInfinity"):
        raise Unsupported(f"infinite size {expr}")
    name = type(expr).__name__
    if _SYMPY.get(name) is not type(expr):
        raise Unsupported(f"symbolic function {name} in {expr}")
    return [name, *(_encode_expr(a) for a in expr.args)]  # type: ignore[attr-defined]


class _Symbols:
    """One fresh FakeTensorMode and ShapeEnv, with the graph's size symbols under their original names."""

    def __init__(self, table: dict[str, list[int | None]], exprs: dict[str, Any]) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        from torch.utils._sympy.numbers import int_oo
        from torch.utils._sympy.value_ranges import ValueRanges

        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.symbols: dict[str, sympy.Symbol] = {}
        env = self.shape_env
        for name, (hint, lower, upper) in table.items():
            if not (name[:1] == "s" and name[1:].isdigit()):
                raise Unsupported(f"symbol {name} (only backed size symbols sN are supported)")
            sym = sympy.Symbol(name, integer=True, positive=True)
            self.symbols[name] = sym
            env.backed_var_to_val[sym] = sympy.Integer(hint if hint is not None else 2)
            env.var_to_range[sym] = ValueRanges(lower if lower is not None else 2,
                                                upper if upper is not None else int_oo)
            env.var_to_sources[sym] = []
            env.unique_ids.add(int(name[1:]))
        self.trees = exprs
        self._exprs: dict[str, sympy.Basic] = {}
        self._values: dict[tuple[str, str], Any] = {}
        self._elems: dict[tuple, torch.Tensor] = {}

    def expr(self, key: str) -> sympy.Basic:
        if key not in self._exprs:
            self._exprs[key] = self._build(self.trees[key])
        return self._exprs[key]

    def _build(self, tree: Any) -> Any:
        if isinstance(tree, int):
            return sympy.Integer(tree)
        head, *rest = tree
        if head == "S":
            return self.symbols[rest[0]]
        if head == "Q":
            return sympy.Rational(rest[0], rest[1])
        if head == "F":
            return sympy.Float(float(rest[0]))
        if head == "B":
            return sympy.true if rest[0] else sympy.false
        if head not in _SYMPY:
            raise Unsupported(f"symbolic function {head}")
        return _SYMPY[head](*(self._build(a) for a in rest))

    def value(self, kind: str, key: str) -> Any:
        """The SymInt ("I"), SymBool ("B") or SymFloat ("F") for an expression, made once."""
        if (kind, key) not in self._values:
            expr, env = self.expr(key), self.shape_env
            hint = expr.xreplace(env.backed_var_to_val)
            out: Any
            if kind == "I":
                out = env.create_symintnode(expr, hint=int(hint) if hint.is_Integer else None)
            elif kind == "B":
                out = env.create_symboolnode(expr)
            else:
                out = env.create_symfloatnode(expr, hint=None)
            self._values[(kind, key)] = out
        return self._values[(kind, key)]

    def size(self, dim: int | str) -> Any:
        return dim if isinstance(dim, int) else self.value("I", dim)

    def tensor(self, shape: list[int | str], stride: list[int | str], dtype: str, device: str,
               requires_grad: bool) -> torch.Tensor:
        """A FakeTensor of this layout. Building a symbolic meta tensor costs ~0.2 ms of sympy work, and
        a 30-layer graph has ~50-170 distinct layouts in ~2500 values, so each layout's meta tensor is made
        once and every node gets its own FakeTensor over it (distinct objects, shared meta storage)."""
        from torch._subclasses.fake_tensor import FakeTensor

        key = (tuple(shape), tuple(stride), dtype, device, requires_grad)
        elem = self._elems.get(key)
        if elem is None:
            elem = torch.empty_strided([self.size(d) for d in shape], [self.size(d) for d in stride],
                                       dtype=_DTYPES[dtype], device="meta", requires_grad=requires_grad)
            self._elems[key] = elem
        return FakeTensor(self.mode, elem, torch.device(device))


# ------------------------------------------------------------------ values (args, meta["val"])
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_LAYOUTS = {str(x).removeprefix("torch."): x for x in vars(torch).values() if isinstance(x, torch.layout)}
_FORMATS = {str(x).removeprefix("torch."): x for x in vars(torch).values() if isinstance(x, torch.memory_format)}


def _encode_float(x: float) -> Any:
    return x if math.isfinite(x) else {"f": repr(x)}


def _encode_arg(a: Any) -> Any:
    """An fx argument as JSON; tagged dicts mark everything that is not a plain JSON scalar or list."""
    if isinstance(a, Node):
        return {"n": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return _encode_float(a)
    if isinstance(a, tuple):
        return {"t": [_encode_arg(x) for x in a]}
    if isinstance(a, list):
        return [_encode_arg(x) for x in a]
    if isinstance(a, dict):
        if not all(isinstance(k, str) for k in a):
            raise Unsupported(f"dict argument with non-string keys {list(a)}")
        return {"d": {k: _encode_arg(v) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"mf": str(a).removeprefix("torch.")}
    if isinstance(a, slice):
        return {"slice": [_encode_arg(a.start), _encode_arg(a.stop), _encode_arg(a.step)]}
    raise Unsupported(f"argument of type {type(a).__name__}: {a!r}")


def _decode_arg(a: Any, nodes: dict[str, Node]) -> Any:
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, list):
        return [_decode_arg(x, nodes) for x in a]
    ((tag, v),) = a.items()
    if tag == "n":
        return nodes[v]
    if tag == "t":
        return tuple(_decode_arg(x, nodes) for x in v)
    if tag == "d":
        return {k: _decode_arg(x, nodes) for k, x in v.items()}
    if tag == "f":
        return float(v)
    if tag == "dtype":
        return _DTYPES[v]
    if tag == "device":
        return torch.device(v)
    if tag == "layout":
        return _LAYOUTS[v]
    if tag == "mf":
        return _FORMATS[v]
    if tag == "slice":
        return slice(*(_decode_arg(x, nodes) for x in v))
    raise Unsupported(f"argument tag {tag}")


def _bound(b: Any) -> int | None:
    """A finite integer range bound, or None (unbounded)."""
    return int(b) if b is not None and b.is_Integer else None


class _ValEncoder:
    """meta["val"] summaries; symbolic expressions go to a shared table keyed by their str()."""

    def __init__(self) -> None:
        self.exprs: dict[str, Any] = {}
        self.symbols: dict[str, list[int | None]] = {}
        self._keys: dict[Any, str] = {}  # sympy prints slowly: each distinct expression is printed once

    def _expr(self, s: torch.SymInt | torch.SymBool | torch.SymFloat) -> str:
        expr = s.node.expr
        key = self._keys.get(expr)
        if key is None:
            key = self._keys[expr] = str(expr)
        if key not in self.exprs:
            self.exprs[key] = _encode_expr(expr)
            env = s.node.shape_env
            for sym in expr.free_symbols:
                if not (sym.name[:1] == "s" and sym.name[1:].isdigit()):
                    raise Unsupported(f"symbol {sym.name} in {expr} (only backed size symbols sN are supported)")
                if sym.name not in self.symbols:
                    hint = env.backed_var_to_val.get(sym)
                    vr = env.var_to_range.get(sym)
                    self.symbols[sym.name] = [int(hint) if hint is not None else None,
                                              _bound(vr.lower) if vr else None, _bound(vr.upper) if vr else None]
        return key

    def _dim(self, d: int | torch.SymInt) -> int | str:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            return int(expr) if isinstance(expr, sympy.Integer) else self._expr(d)
        return int(d)

    def encode(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return {"T": [[self._dim(d) for d in v.shape], [self._dim(d) for d in v.stride()],
                          str(v.dtype).removeprefix("torch."), str(v.device), bool(v.requires_grad)]}
        if isinstance(v, torch.SymInt):
            return {"I": self._expr(v)}
        if isinstance(v, torch.SymBool):
            return {"B": self._expr(v)}
        if isinstance(v, torch.SymFloat):
            return {"F": self._expr(v)}
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return _encode_float(v)
        if isinstance(v, (list, tuple)):
            return {"L" if isinstance(v, list) else "U": [self.encode(x) for x in v]}
        raise Unsupported(f"meta['val'] of type {type(v).__name__}")


def _decode_val(v: Any, symbols: _Symbols) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    ((tag, x),) = v.items()
    if tag == "T":
        return symbols.tensor(*x)
    if tag in ("I", "B", "F"):
        return symbols.value(tag, x)
    if tag == "f":
        return float(x)
    if tag in ("L", "U"):
        items = [_decode_val(y, symbols) for y in x]
        return items if tag == "L" else tuple(items)
    raise Unsupported(f"meta['val'] tag {tag}")


# ------------------------------------------------------------------ dump
def _tensor_paths(root: nn.Module) -> dict[int, str]:
    paths: dict[int, str] = {}
    for name, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        paths.setdefault(id(t), name)
    return paths


def _resolve(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _dump_guards(gm: GraphModule, node: Node) -> dict[str, Any]:
    """The guards module's checks as trees (`garage._guards`), from the source torch generated for it."""
    module = _resolve(gm, str(node.target))
    source = getattr(module, GUARD_SOURCE, None)
    if type(module).__name__ != "GuardsFn" or node.users or source is None:
        raise Unsupported(f"call_module {node.target} ({type(module).__name__})")
    code, paths = source
    placeholders = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    if [getattr(a, "name", None) for a in node.args] != placeholders or len(paths) != len(placeholders):
        raise Unsupported("a guards module that does not take every input")
    inputs = {path: i for i, path in enumerate(paths)}
    try:
        checks = [[_guards.parse(line, inputs), _guards.message(line)] for line in code]
    except (SyntaxError, _guards.GuardSyntax) as err:
        raise Unsupported(str(err)) from None
    return {"inputs": len(paths), "checks": checks}


def _dump_graph(gm: GraphModule, root_paths: dict[int, str], tensors: dict[str, torch.Tensor],
                stored: dict[int, str], vals: _ValEncoder, prefix: str) -> dict[str, Any]:
    stacks: dict[str, int] = {}
    stack_list: list[Any] = []
    nodes: list[dict[str, Any]] = []
    attrs: dict[str, Any] = {}
    submodules: dict[str, Any] = {}
    guards: dict[str, Any] = {}
    codegen = gm.graph._codegen
    pytree_info = None
    if isinstance(codegen, torch.fx.graph._PyTreeCodeGen):
        info = codegen.pytree_info
        pytree_info = {"orig_args": list(info.orig_args),
                       "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec is not None else None,
                       "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None}
    elif type(codegen) is not torch.fx.graph.CodeGen:
        raise Unsupported(f"graph codegen {type(codegen).__name__}")

    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = _encode_target(node.target)
        else:
            entry["target"] = node.target
        if node.op == "get_attr" and node.target not in attrs:
            obj = _resolve(gm, node.target)
            if isinstance(obj, GraphModule):  # a higher-order op's body
                submodules[node.target] = _dump_graph(obj, root_paths, tensors, stored, vals,
                                                      f"{prefix}{node.target}.")
                attrs[node.target] = {"graph": node.target}
            elif isinstance(obj, torch.Tensor):
                kind = "parameter" if isinstance(obj, nn.Parameter) else "tensor"
                if id(obj) in root_paths:
                    attrs[node.target] = {"root": root_paths[id(obj)], "kind": kind, "shape": list(obj.shape),
                                          "dtype": str(obj.dtype).removeprefix("torch.")}
                else:
                    if id(obj) not in stored:
                        stored[id(obj)] = key = prefix + node.target
                        tensors[key] = obj.detach().contiguous().clone()
                    attrs[node.target] = {"stored": stored[id(obj)], "kind": kind,
                                          "requires_grad": bool(obj.requires_grad)}
            else:
                raise Unsupported(f"get_attr {node.target} of type {type(obj).__name__}")
        if node.op == "call_module":
            guards[node.target] = _dump_guards(gm, node)
        elif node.op not in ("placeholder", "get_attr", "call_function", "output"):
            raise Unsupported(f"node op {node.op}")
        if node.args:
            entry["args"] = _encode_arg(tuple(node.args))["t"]
        if node.kwargs:
            entry["kwargs"] = _encode_arg(dict(node.kwargs))["d"]
        stack = node.meta.get("nn_module_stack")
        if stack is not None:
            key = repr(stack)
            if key not in stacks:
                stacks[key] = len(stack_list)
                stack_list.append([[k, path, ty if isinstance(ty, str) else f"{ty.__module__}.{ty.__qualname__}"]
                                   for k, (path, ty) in stack.items()])
            entry["stack"] = stacks[key]
        if "val" in node.meta:
            entry["val"] = vals.encode(node.meta["val"])
        nodes.append(entry)

    return {"class_name": type(gm).__name__ if type(gm).__name__ != "GraphModuleImpl" else "GraphModule",
            "nodes": nodes, "stacks": stack_list, "attrs": attrs, "submodules": submodules, "guards": guards,
            "pytree": pytree_info, "meta": _encode_module_meta(getattr(gm, "meta", None))}


def _encode_module_meta(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """The GraphModule's own meta: empty `inline_constraints` and `partition_names` (a set of names) are
    kept; anything else is dropped, and listed under "dropped" so that a caller can see it."""
    if meta is None:
        return None
    out: dict[str, Any] = {}
    dropped = []
    for key, value in meta.items():
        if key == "inline_constraints" and not value:
            out[key] = {}
        elif key == "partition_names" and isinstance(value, (set, frozenset)) and all(isinstance(v, str) for v in value):
            out[key] = sorted(value)
        else:
            dropped.append(key)
    return {"keep": out, "dropped": dropped}


def _decode_module_meta(enc: dict[str, Any] | None) -> dict[str, Any] | None:
    if enc is None:
        return None
    return {k: set(v) if k == "partition_names" else v for k, v in enc["keep"].items()}


def dump(gm: GraphModule, root: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The graph as JSON-able data, and the tensors it owns that are not `root`'s parameters or buffers.

    Raises Unsupported for anything the format cannot store without pickle or code (then do not cache)."""
    vals = _ValEncoder()
    tensors: dict[str, torch.Tensor] = {}
    graph = _dump_graph(gm, _tensor_paths(root), tensors, {}, vals, "")
    return {"format": FORMAT, "torch": torch.__version__, "graph": graph, "exprs": vals.exprs,
            "symbols": vals.symbols}, tensors


# ------------------------------------------------------------------ load
def _identifier(name: Any) -> str:
    """A name that torch.fx pastes into the code it generates (an input, a node, a keyword argument): a
    Python identifier that is not a keyword or a dunder, so nothing else can reach the code."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or (
            name.startswith("__") and name.endswith("__")):
        raise Unsupported(f"name {name!r} is not a plain identifier")
    return name


def _check_target(target: Any) -> str:
    """An attribute path a cached graph may create on its GraphModule: dotted identifiers or indices, none
    a dunder or a GraphModule attribute."""
    if not isinstance(target, str):
        raise Unsupported(f"attribute target {target!r}")
    for part in target.split("."):
        if not part.isdigit():
            _identifier(part)
        if part.startswith("__") or part in _RESERVED:
            raise Unsupported(f"attribute target {target!r}")
    return target


_RESERVED = frozenset(dir(GraphModule))  # forward, graph, code, training, …


def _check_in_spec(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """An input spec of tuples, lists and dicts keyed by identifiers: its dict keys are pasted into the
    generated `forward`."""
    todo = [spec]
    while todo:
        node = todo.pop()
        if node.type is None:
            continue
        if node.type not in (tuple, list, dict):
            raise Unsupported(f"input spec node of type {node.type}")
        if node.type is dict:
            for key in node.context:
                _identifier(key)
        todo.extend(node.child(i) for i in range(node.num_children))
    return spec


def _load_graph(desc: dict[str, Any], tensors: dict[str, torch.Tensor], root_tensors: dict[str, torch.Tensor],
                symbols: _Symbols) -> GraphModule:
    from torch.fx._lazy_graph_module import _LazyGraphModule

    graph = Graph()
    pytree_info = desc["pytree"]
    if pytree_info is not None:
        in_spec = _check_in_spec(pytree.treespec_loads(pytree_info["in_spec"])) if pytree_info["in_spec"] else None
        out_spec = pytree.treespec_loads(pytree_info["out_spec"]) if pytree_info["out_spec"] else None
        orig_args = [_identifier(name) for name in pytree_info["orig_args"]]
        graph._codegen = torch.fx.graph._PyTreeCodeGen(
            torch.fx.graph._PyTreeInfo(orig_args, in_spec, out_spec))  # type: ignore[arg-type]

    owners: dict[str, Any] = {}
    for target, attr in desc["attrs"].items():
        _check_target(target)
        if "graph" in attr:
            owners[target] = _load_graph(desc["submodules"][attr["graph"]], tensors, root_tensors, symbols)
            continue
        if "root" in attr:
            t = root_tensors.get(attr["root"])
            if t is None:
                raise CacheMismatch(f"the model has no parameter or buffer {attr['root']}")
            if (list(t.shape) != attr["shape"]
                    or str(t.dtype).removeprefix("torch.") != attr["dtype"]):
                raise CacheMismatch(f"{attr['root']} is not a {attr['dtype']} tensor of shape {attr['shape']}")
        else:
            t = tensors[attr["stored"]]
            if attr["kind"] == "parameter":
                t = nn.Parameter(t, requires_grad=attr["requires_grad"])
        owners[target] = t
    for target, guards in desc["guards"].items():
        checks = [(_guards.check(tree, guards["inputs"]), str(text)) for tree, text in guards["checks"]]
        owners[_check_target(target)] = InputGuards(checks)

    stacks = [{k: (path, ty) for k, path, ty in stack} for stack in desc["stacks"]]
    nodes: dict[str, Node] = {}
    for entry in desc["nodes"]:
        op, target = entry["op"], entry["target"]
        if op == "call_function":
            target = _decode_target(target)
        elif op in ("get_attr", "call_module"):
            if target not in owners:
                raise Unsupported(f"{op} of an undeclared attribute {target!r}")
        elif op == "placeholder" and not entry.get("args") and not entry.get("kwargs"):
            target = _identifier(target)
        elif op != "output":
            raise Unsupported(f"node op {op}")
        args = tuple(_decode_arg(a, nodes) for a in entry.get("args", ()))
        kwargs = {_identifier(k): _decode_arg(v, nodes) for k, v in entry.get("kwargs", {}).items()}
        if op == "output":
            node = graph.output(args[0] if args else None)
        else:
            node = graph.create_node(op, target, args, kwargs, name=_identifier(entry["name"]))
        if node.name != entry["name"]:
            raise Unsupported(f"node {entry['name']} was renamed {node.name}")
        if "stack" in entry:
            node.meta["nn_module_stack"] = dict(stacks[entry["stack"]])  # each node owns its dict, as in export
        if "val" in entry:
            node.meta["val"] = _decode_val(entry["val"], symbols)
        nodes[entry["name"]] = node

    gm = _LazyGraphModule(owners, graph, class_name=_identifier(desc["class_name"]))
    if pytree_info is not None:
        info = graph._codegen.pytree_info  # type: ignore[attr-defined]
        gm._in_spec, gm._out_spec = info.in_spec, info.out_spec
    meta = _decode_module_meta(desc["meta"])
    if meta is not None:
        gm.meta = meta
    return gm


def load(desc: dict[str, Any], tensors: dict[str, torch.Tensor], root: nn.Module) -> GraphModule:
    """The GraphModule `desc` describes, over `root`'s live parameters and buffers (shared, not copied).

    Its code is generated on first call (a lazy GraphModule)."""
    if desc.get("format") != FORMAT:
        raise CacheMismatch(f"cache format {desc.get('format')}, expected {FORMAT}")
    if desc.get("torch") != torch.__version__:
        raise CacheMismatch(f"cached by torch {desc.get('torch')}, this is {torch.__version__}")
    symbols = _Symbols(desc["symbols"], desc["exprs"])
    root_tensors = dict(root.named_buffers(remove_duplicate=False))
    root_tensors.update(root.named_parameters(remove_duplicate=False))
    return _load_graph(desc["graph"], tensors, root_tensors, symbols)


JSON, TENSORS = "graph.json", "graph.safetensors"  # an entry's files


def save(folder: str, desc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The graph's two files in `folder`."""
    with open(os.path.join(folder, JSON), "w", encoding="utf-8") as f:
        f.write(json.dumps(desc, separators=(",", ":"), allow_nan=False))  # json.dump writes in small pieces: slow
    save_file(tensors, os.path.join(folder, TENSORS))


def parse(files: dict[str, bytes], device: str = "cpu") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What `save` wrote, from the bytes of its files (read and authenticated once by the caller; safetensors
    never unpickles)."""
    desc = json.loads(files[JSON])
    if not isinstance(desc, dict):
        raise Unsupported("the description is not a JSON object")
    return desc, {name: t.to(device) for name, t in safetensors_load(files[TENSORS]).items()}


__all__ = ["CacheMismatch", "GUARD_SOURCE", "Unsupported", "dump", "load", "parse", "save"]
