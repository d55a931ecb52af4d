"""Spec + model → Plan: every site made concrete (layer, component, module path) for this model.

All problems are collected; `resolve` raises one ResolveError carrying them, `resolve_collect` returns them
for the validator to merge with its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

from torch import nn

from ..lang import spec as ast
from ..lang.diagnostics import (
    Diagnostic,
    Problem,
    ResolveError,
    Source,
    Span,
    did_you_mean,
    raise_if_errors,
)
from ..lang.formatter import format_int_set, format_positions, format_string
from .archs import NO_SITE, ModelInfo

SiteKind = str  # "in" | "out" | "attn" | "cross" | "mlp" | "mlp.hidden" | "attn.heads" | "router" | "final" | "module"
INPUT_KINDS = ("in", "mlp.hidden", "attn.heads")  # sites that are a module's input, not its output


@dataclass(frozen=True)
class ConcreteSite:
    """One hidden state of one model. `module_path` is the module whose output it is (its input, for "in",
    "mlp.hidden" and "attn.heads"; the router module, whose logits are the first value it computes, for
    "router"). `width` is the state's last dimension when it is not the model's hidden size. An
    "attn.heads" site splits that width into `head_count` heads, of which ops touch `heads` (None: all).
    `stack` is "encoder" or "decoder" on an encoder–decoder model: its positions are that stack's tokens."""

    kind: SiteKind
    layer: int | None
    module_path: str
    positions: ast.Positions | None = None
    width: int | None = None
    heads: tuple[int, ...] | None = None
    head_count: int = 0
    stack: str = ""

    @property
    def op_width(self) -> int | None:
        """The last dimension ops see: a head's size at an attn.heads site, else the site's width."""
        return self.width // self.head_count if self.width and self.head_count else self.width

    @property
    def is_input(self) -> bool:
        return self.kind in INPUT_KINDS

    @property
    def label(self) -> str:
        """The canonical spelling, e.g. `h.6.mlp`, `embed`, `final`, `"model.layers.2.mlp.up_proj"`,
        `decoder.h.1.cross`."""
        stack = f"{self.stack}." if self.stack else ""
        if self.kind == "in" and self.layer == 0:
            text = stack + "embed"
        elif self.kind == "final":
            text = stack + "final"
        elif self.kind == "module":
            text = format_string(self.module_path)
        else:
            text = f"{stack}h.{self.layer}" + ("" if self.kind == "out" else f".{self.kind}")
        return text + (format_int_set(self.heads) if self.heads is not None else "") + format_positions(self.positions)

    @property
    def key(self) -> tuple[SiteKind, str]:
        """Sites with the same key are the same tensor, whatever their positions."""
        return (self.kind, self.module_path)


@dataclass(frozen=True)
class Gate:
    """A statement's condition (`when …`), with its site made concrete."""

    site: ConcreteSite
    condition: ast.Condition


@dataclass(frozen=True)
class Step:
    """One op at one concrete site, from statement number `statement` (0-based) of the spec."""

    site: ConcreteSite
    op: ast.Op
    span: Span
    statement: int
    when: Gate | None = None


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    info: ModelInfo
    spec: ast.Spec

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)




# ------------------------------------------------------------------ layer indices
def _index(expr: ast.IndexExpr, n: int, owner: str = "this model") -> int:
    if isinstance(expr, ast.Index):
        value = expr.value + n if expr.value < 0 else expr.value
        written = str(expr.value)
    elif isinstance(expr, ast.NIndex):
        value = n + expr.offset
        written = "N" if expr.offset == 0 else f"N{expr.offset:+d}"
    else:
        value = int(Fraction(repr(expr.percent)) * n // 100)
        written = f"{expr.percent:g}%"
    if not 0 <= value < n:
        shown = written if written == str(value) else f"{written} (= {value})"
        raise Problem(
            expr.span,
            f"layer {shown} is out of range: {owner} has {n} layers (0..{n - 1})",
            f"use an index in 0..{n - 1}, -1 or N-1 for the last block",
        )
    return value


def layer_indices(sel: ast.LayerSelector, n: int, owner: str = "this model") -> list[int]:
    """The block indices a selector names on a model (or `owner`, a stack of it) of n blocks, in order, without
    repeats."""
    if isinstance(sel, ast.AllLayers):
        return list(range(n))
    if isinstance(sel, ast.LayerRange):
        start, end = _index(sel.start, n, owner), _index(sel.end, n, owner)
        if end < start:
            raise Problem(sel.span, f"empty layer range: {start} > {end}", f"write {end}..{start}")
        return list(range(start, end + 1))
    if isinstance(sel, ast.LayerSet):
        return list(dict.fromkeys(i for item in sel.items for i in layer_indices(item, n, owner)))
    return [_index(sel, n, owner)]


# ------------------------------------------------------------------ sites
def _ffn_hidden(info: ModelInfo, layer: int, site: ast.BlockSite) -> ConcreteSite:
    """`h.I.mlp.hidden`: the input of the FFN's down projection (after the activation and any gate)."""
    if info.has(layer, info.router):
        raise Problem(site.span, f"block {layer} of this model ({info.model_type}) has a mixture-of-experts MLP: each "
                      "expert has its own hidden layer, run only on the tokens routed to it, so there is no one mlp.hidden",
                      "use h.I.mlp (the MoE block's output), h.I.router (its routing), or name one expert's module by "
                      "its quoted path")
    if not info.has(layer, info.down) or info.ffn_width is None or layer not in info.mlp_blocks:
        raise Problem(site.span, f"this model ({info.model_type}) has no FFN down projection that garage knows",
                      _ARCH_HINT)
    return ConcreteSite("mlp.hidden", layer, f"{info.block(layer)}.{info.down}", site.positions, info.ffn_width)


def _attn_heads(info: ModelInfo, layer: int, site: ast.BlockSite) -> ConcreteSite:
    """`h.I.attn.heads`: the input of attention's output projection, [batch, seq, heads × head size]."""
    if info.attn is not None and layer not in info.attn_blocks:
        raise _missing(info, "attn", layer, site.span)
    if not info.has(layer, info.attn_out) or info.head_size is None:
        raise Problem(site.span, f"this model ({info.model_type}) has no attention output projection that garage "
                      "splits into heads", "give its model_type's row in garage.ARCHS an `attn_out` path")
    if site.heads and site.heads[-1] >= info.heads:
        raise Problem(site.span, f"head {site.heads[-1]} is out of range: this model has {info.heads} attention heads "
                      f"(0..{info.heads - 1})", f"choose heads in 0..{info.heads - 1}")
    return ConcreteSite("attn.heads", layer, f"{info.block(layer)}.{info.attn_out}", site.positions,
                        info.head_width, site.heads, info.heads)


def _router(info: ModelInfo, layer: int, site: ast.BlockSite) -> ConcreteSite:
    """`h.I.router`: an MoE block's router logits, before softmax and top-k."""
    if info.router is None:
        raise Problem(site.span, f"this model ({info.model_type}) has no mixture-of-experts router that garage knows",
                      "h.I.router needs an MoE model (Mixtral, Qwen-MoE, OLMoE, DeepSeek, …); here, h.I.mlp is the MLP")
    if not info.has(layer, info.router):
        moe = [i for i in range(info.num_layers) if info.has(i, info.router)]
        raise Problem(site.span, f"block {layer} has a dense MLP, not a mixture of experts",
                      f"this model routes in blocks {_ranges(moe)}")
    return ConcreteSite("router", layer, f"{info.block(layer)}.{info.router}", site.positions, info.experts)


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] → "1..3, 5"."""
    return format_int_set(tuple(numbers))[1:-1]


def _component_path(info: ModelInfo, kind: str, layer: int, span: Span) -> str:
    if kind == "cross":
        return _cross(info, layer, span)
    rel = {"attn": info.attn, "mlp": info.mlp}.get(kind)
    if kind in ("attn", "mlp") and (rel is None or layer not in info.blocks_with(kind)):
        raise _missing(info, kind, layer, span)
    return info.block(layer) + (f".{rel}" if rel else "")


def _cross(info: ModelInfo, layer: int, span: Span) -> str:
    """`decoder.h.I.cross`: the output of cross-attention (over the encoder's states) before its residual add."""
    if info.has(layer, info.cross):
        return f"{info.block(layer)}.{info.cross}"
    if info.stack == "encoder":
        raise Problem(span, "the encoder has no cross-attention: its blocks attend to the source only",
                      "cross-attention is in the decoder: write decoder.h.I.cross")
    raise Problem(span, f"block {layer} of this model ({info.model_type}) has no cross-attention",
                  "h.I.cross is the decoder's attention over the encoder, in an encoder–decoder model (T5, BART, …)")


_KIND_NAMES = {"attn": "attention", "mlp": "MLP"}


def _missing(info: ModelInfo, kind: str, layer: int, span: Span) -> Problem:
    """No such sublayer in this block: which blocks have one, or, when none does, what the block holds."""
    having = sorted(info.blocks_with(kind))
    if having:
        return Problem(span, f"block {layer} of this model ({info.model_type}) has no {_KIND_NAMES[kind]}",
                       f"its blocks with {_KIND_NAMES[kind]} are {_ranges(having)}")
    parts = info.block_children.get(layer, ())
    holds = f": its block {layer} holds {', '.join(parts)}" if parts else ""
    return Problem(span, f"this model ({info.model_type}) has no {_KIND_NAMES[kind]} sublayer that garage finds{holds}",
                   _ARCH_HINT)


_ARCH_HINT = "name the module by its quoted path, or add a row for this model_type to garage.ARCHS"


def _classify(info: ModelInfo, path: str, positions: ast.Positions | None) -> ConcreteSite:
    """A module path, named as the site garage knows it by when it is one (block, attn, mlp, final)."""
    if path == info.final_norm:
        return ConcreteSite("final", None, path, positions)
    prefix = info.blocks + "."
    if path.startswith(prefix):
        head, _, rest = path[len(prefix):].partition(".")
        if head.isdigit():
            layer = int(head)
            kind = {"": "out", info.attn: "attn", info.mlp: "mlp", info.router: "router", info.cross: "cross"
                    }.get(rest, "module")
            width = info.experts if kind == "router" else info.out_widths.get(path) if kind == "module" else None
            return ConcreteSite(kind, layer, path, positions, width)
    return ConcreteSite("module", None, path, positions, info.out_widths.get(path))


def _module_path(info: ModelInfo, path: str, span: Span, scope: str = "") -> str:
    if path in info.module_names:
        return path
    pool = [n[len(scope):] for n in info.module_names if n.startswith(scope) and n != scope] if scope else info.module_names
    wanted = path[len(scope):] if scope else path
    hint = did_you_mean(wanted, pool) or "list the model's modules with model.named_modules()"
    where = f"in block {scope[len(info.blocks) + 1:-1]}" if scope else "in this model"
    raise Problem(span, f"no module '{wanted}' {where}", hint)


def _check_container(info: ModelInfo, site: ast.BlockSite) -> None:
    if site.container is None or info.stack:  # a stack's container was checked when it was chosen
        return
    written = ".".join(site.container)
    if written not in info.block_container_names:
        raise Problem(
            site.span,
            f"'{written}' is not this model's block list ({info.blocks})",
            f"write h.I or {info.blocks}.I",
        )


def _refuse(info: ModelInfo, kind: str, span: Span) -> None:
    """A site kind this family has no one value for (archs.NO_SITE): an error with the reason."""
    why = NO_SITE.get(info.model_type, {}).get(kind)
    if why:
        raise Problem(span, f"this model ({info.model_type}) has no such site: {why}",
                      "name another site, or a module inside a block by its path")


_SPECIAL = {"mlp.hidden": _ffn_hidden, "attn.heads": _attn_heads, "router": _router}


def concrete_sites(info: ModelInfo, site: ast.Site) -> list[ConcreteSite]:
    """Every concrete site that one written site names on this model (on an encoder–decoder model, in the
    stack it names, its layers counted within that stack)."""
    if info.stacks:
        stack = _stack_named(info, site)
        return [dataclasses.replace(found, stack=stack.stack) for found in _sites_in(stack, site)]
    if isinstance(site, ast.NamedSite) and site.stack:
        raise Problem(site.span, f"this model ({info.model_type}) has one stack of blocks, not an encoder and a decoder",
                      f"write {site.name}")
    return _sites_in(info, site)


def _stack_named(info: ModelInfo, site: ast.Site) -> ModelInfo:
    """The stack of an encoder–decoder model that a site names: `encoder.h.I`, `decoder.final`, a module path
    inside one; a bare `h.I`, `embed` or `final` is ambiguous, and a diagnostic that names both."""
    stacks = info.stacks
    if isinstance(site, ast.ModuleSite):
        inside = [s for s in stacks.values() if site.path.startswith(s.blocks.rpartition(".")[0] + ".")]
        return inside[0] if inside else stacks["decoder"]  # the LM head, shared embeddings: either serves
    if isinstance(site, ast.NamedSite):
        if site.stack:
            return stacks[site.stack]
        raise Problem(site.span, f"`{site.name}` is ambiguous on an encoder–decoder model ({info.model_type}): "
                      "its encoder and its decoder each have one", f"write encoder.{site.name} or decoder.{site.name}")
    written = ".".join(site.container or ())
    if site.container is None or written in ast.LAYER_ALIASES:
        sizes = " and the ".join(f"{name} of {s.num_layers} blocks" for name, s in stacks.items())
        raise Problem(site.span, f"this is an encoder–decoder model ({info.model_type}): it has two stacks, the "
                      f"{sizes}, and `h.I` does not say which", "write encoder.h.I or decoder.h.I (layers, N and % "
                      "count within the stack named)")
    if len(site.container) == 2 and site.container[0] in stacks and site.container[1] in ast.LAYER_ALIASES:
        return stacks[site.container[0]]
    named = [s for s in stacks.values() if written in s.block_container_names[:-1]]  # not a bare `layers`
    if len(named) != 1:
        raise Problem(site.span, f"'{written}' is not one of this model's block lists "
                      f"({', '.join(s.blocks for s in stacks.values())})", "write encoder.h.I or decoder.h.I")
    return named[0]


def _sites_in(info: ModelInfo, site: ast.Site) -> list[ConcreteSite]:
    """Every concrete site that one written site names in one stack of blocks."""
    if isinstance(site, ast.NamedSite):
        if site.name == "embed":
            _refuse(info, "in", site.span)
            return [ConcreteSite("in", 0, info.block(0), site.positions)]
        if info.final_norm is None:
            last = f"{info.stack}.h.-1" if info.stack else "h.-1"
            where = f"the {info.stack} of this model" if info.stack else "this model"
            raise Problem(site.span, f"{where} ({info.model_type}) has no final norm", f"use {last} for the last block's output")
        return [ConcreteSite("final", None, info.final_norm, site.positions, info.out_widths.get(info.final_norm))]
    if isinstance(site, ast.ModuleSite):
        return [_classify(info, _module_path(info, site.path, site.span), site.positions)]

    _check_container(info, site)
    sites = []
    for layer in layer_indices(site.layers, info.num_layers, f"the {info.stack}" if info.stack else "this model"):
        if site.subpath:
            scope = info.block(layer) + "."
            path = _module_path(info, scope + ".".join(site.subpath), site.span, scope)
            sites.append(_classify(info, path, site.positions))
        elif site.component in ("in", "out"):
            _refuse(info, site.component, site.span)
            sites.append(ConcreteSite(site.component, layer, info.block(layer), site.positions))
        elif site.component in _SPECIAL:
            sites.append(_SPECIAL[site.component](info, layer, site))
        else:  # a sublayer that works in another width than the stream's (MobileBERT's bottlenecks) says so
            path = _component_path(info, site.component, layer, site.span)
            sites.append(ConcreteSite(site.component, layer, path, site.positions, info.out_widths.get(path)))
    return sites


# ------------------------------------------------------------------ conditions
GATE_KINDS = ("in", "attn", "mlp", "out")  # sites of the hidden width, one value a token
# Where in a block each kind of site is computed, first to last (a module path counts as the block's start).
IN_BLOCK = {"in": 0, "module": 0, "attn.heads": 1, "attn": 2, "cross": 3, "mlp.hidden": 4, "router": 4, "mlp": 5,
            "out": 6}


def _when(site: ConcreteSite, info: ModelInfo) -> tuple[int, int, int]:
    """When the model computes a site: the encoder's before the decoder's, blocks in order, the final norm last."""
    stack = info.stacks.get(site.stack, info)
    return (site.stack == "decoder", *((stack.num_layers, 0) if site.layer is None else (site.layer, IN_BLOCK[site.kind])))


def gate(info: ModelInfo, condition: ast.Condition, steered: list[ConcreteSite]) -> Gate:
    """The condition's one site, which the model must compute before (or at) every steered site."""
    found = concrete_sites(info, condition.site)
    if len(found) != 1 or found[0].kind not in GATE_KINDS:
        raise Problem(condition.site.span, "a condition reads one site of the hidden width: h.I, h.I.in, embed, "
                      "h.I.attn or h.I.mlp", "name one block, e.g. when h.6 @ v > 0.25")
    site = found[0]
    late = [s for s in steered if _when(site, info) > _when(s, info) or (s.kind == "module" and s.layer == site.layer)]
    if late:
        raise Problem(condition.site.span, f"the condition reads {site.label}, which the model computes after "
                      f"{late[0].label}, where the op acts", f"read the condition at or before {late[0].label}")
    return Gate(site, condition)


# ------------------------------------------------------------------ expectations
def _check_expect(info: ModelInfo, stmt: ast.Expect) -> None:
    actual = {"layers": info.num_layers, "hidden": info.hidden_size, "model": info.model_type}[stmt.key]
    if actual != stmt.value:
        wanted = {
            "layers": f"expected {stmt.value} layers, but this model has {actual}",
            "hidden": f"expected hidden size {stmt.value}, but this model's is {actual}",
            "model": f"expected model type {format_string(str(stmt.value))}, but this model is {format_string(str(actual))}",
        }[stmt.key]
        raise Problem(
            stmt.span,
            wanted,
            "this spec was written for another model; change the expect line if it fits this one",
        )


# ------------------------------------------------------------------ entry points
def resolve_collect(spec: ast.Spec, info: ModelInfo) -> tuple[Plan, list[Diagnostic]]:
    """The plan of every statement that resolves, and a diagnostic for each that does not."""
    source: Source = spec.source
    steps: list[Step] = []
    diagnostics: list[Diagnostic] = []
    for number, stmt in enumerate(spec):
        try:
            if isinstance(stmt, ast.Expect):
                _check_expect(info, stmt)
                continue
            sites = concrete_sites(info, stmt.site)
            when = gate(info, stmt.when, sites) if stmt.when is not None else None
            steps += [Step(site, stmt.op, stmt.span, number, when) for site in sites]
        except Problem as problem:
            diagnostics.append(problem.diagnostic(source))
    return Plan(tuple(steps), info, spec), diagnostics


def resolve(spec: ast.Spec, model: nn.Module | ModelInfo) -> Plan:
    """Make every site of the spec concrete for this model. Raises ResolveError with every problem."""
    info = model if isinstance(model, ModelInfo) else ModelInfo.from_model(model)
    plan, diagnostics = resolve_collect(spec, info)
    raise_if_errors(diagnostics, ResolveError)
    return plan
