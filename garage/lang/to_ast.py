"""Lark tree of one statement → AST node, with semantic checks that the grammar cannot express.

Positions from lark count from the start of the statement's chunk; `ToAst` maps them to file positions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from lark import Token, Transformer_NonRecursive, v_args
from lark.tree import Meta

from . import spec as ast
from .diagnostics import Problem, Span


@dataclass(frozen=True)
class Chunk:
    """The text of one statement and where it starts in the file."""

    text: str
    line: int
    column: int


def _file_span(chunk: Chunk, line: int, column: int, end_column: int) -> Span:
    """A lark position (counted from the start of the statement's chunk) in file coordinates."""
    return Span(chunk.line + line - 1, chunk.column + column - 1, chunk.column + end_column - 1)


def _unquote(token: Token) -> str:
    body, out, i = token[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] in '"\\':
            out.append(body[i + 1])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".gguf")


def _file_value(text: str, span: Span) -> ast.FileValue:
    """`"file.safetensors#key"` names one tensor of the file."""
    path, sep, key = text.rpartition("#")
    if sep and key and path.endswith(_FILE_SUFFIXES):
        return ast.FileValue(path, key, span)
    return ast.FileValue(text, None, span)


@dataclass(frozen=True)
class HeadSet:
    """A head subset as parsed, with its span (for the error when its site has no heads)."""

    items: tuple[int, ...]
    span: Span


Clause = tuple[str, Any, Span]  # a blade or debate clause: (field, value, span)
_SET_ITEM = re.compile(r"(\d+)(?:\s*\.\.\s*(\d+))?")  # one item of an int_set: `12` or `40..43`
FeatureSet = tuple[tuple[int, ...], tuple[tuple[int, int, Span], ...]]  # features, and each item's (first, last, span)


@v_args(meta=True)
class ToAst(Transformer_NonRecursive):
    """Builds AST nodes from the lark tree of one statement; raises Problem on semantic errors.

    Non-recursive, so that deep trees (a module path of hundreds of parts) do not exhaust the stack."""

    def __init__(self, chunk: Chunk) -> None:
        super().__init__()
        self.chunk = chunk

    def _span(self, meta: Meta) -> Span:
        return _file_span(self.chunk, meta.line, meta.column, meta.end_column)

    def _tok(self, tok: Token) -> Span:
        return _file_span(self.chunk, tok.line or 1, tok.column or 1, tok.end_column or 1)

    # numbers ---------------------------------------------------------
    def number(self, meta: Meta, children: list[Any]) -> float:
        sign = -1.0 if len(children) == 2 and children[0] == "-" else 1.0
        value = sign * float(children[-1])
        if not math.isfinite(value):
            raise Problem(self._span(meta), f"number {''.join(children)} is too large", "use a finite number")
        return value

    def _int(self, tok: Token, what: str) -> int:
        if len(tok) > 9:
            raise Problem(self._tok(tok), f"{what} {tok} is too large")
        return int(tok)

    # statements ------------------------------------------------------
    def at_stmt(self, meta: Meta, children: list[Any]) -> ast.At:
        site, op, *when = children
        return ast.At(site, op, self._span(meta), when[0] if when else None)

    def condition(self, meta: Meta, children: list[Any]) -> ast.Condition:
        site, value, compare, threshold, *soft = children
        if soft and not soft[0] > 0:
            raise Problem(self._span(meta), f"a soft condition's temperature must be positive, got {soft[0]:g}",
                          "write soft 0.05 (smaller is sharper), or leave it out for a hard threshold")
        if site.positions is not None or getattr(site, "heads", None) is not None:
            raise Problem(site.span, "a condition reads a site's whole state: the mean over a row's tokens",
                          "write the condition's site without [positions] or {heads}")
        return ast.Condition(site, value, str(compare), threshold, soft[0] if soft else None, self._span(meta))

    def expect_key(self, meta: Meta, children: list[Any]) -> str:
        return str(children[0])

    def expect_stmt(self, meta: Meta, children: list[Any]) -> ast.Expect:
        key, value = children
        if key == "model":
            if value.type != "STRING":
                raise Problem(self._tok(value), "`expect model` takes a quoted model type", 'write expect model "gpt2"')
            return ast.Expect(key, _unquote(value), self._span(meta))
        if value.type != "INT":
            raise Problem(self._tok(value), f"`expect {key}` takes an integer", f"write expect {key} 12")
        return ast.Expect(key, self._int(value, key), self._span(meta))

    # sites -----------------------------------------------------------
    def site(self, meta: Meta, children: list[Any]) -> ast.Site:
        site, rest = children[0], children[1:]
        positions = next((c for c in rest if isinstance(c, ast.Positions)), None)
        heads = next((c for c in rest if isinstance(c, HeadSet)), None)
        if heads is None:
            return replace(site, positions=positions, span=self._span(meta))
        if not (isinstance(site, ast.BlockSite) and site.component == "attn.heads"):
            raise Problem(heads.span, "a set in braces after a site chooses attention heads, and this site has none",
                          "write h.I.attn.heads{0, 5}; token positions go in brackets, as in h.I[last]")
        return replace(site, heads=heads.items, positions=positions, span=self._span(meta))

    def head_set(self, meta: Meta, children: list[Any]) -> "HeadSet":
        return HeadSet(children[0], self._span(meta))

    def int_set(self, meta: Meta, children: list[Any]) -> tuple[int, ...]:
        """`{0, 5, 8..11}`: sorted, without repeats (heads or experts, counted from 0)."""
        found: set[int] = set()
        for item in children:
            found.update(item if isinstance(item, range) else (self._int(item, "index"),))
        return tuple(sorted(found))

    def int_range(self, meta: Meta, children: list[Any]) -> range:
        start, end = (self._int(c, "index") for c in children)
        if end < start:
            raise Problem(self._span(meta), f"empty range {start}..{end}", f"write {end}..{start}")
        return range(start, end + 1)

    def raw_site(self, meta: Meta, children: list[Any]) -> ast.ModuleSite:
        return ast.ModuleSite(_unquote(children[0]), span=self._span(meta))

    def bare_site(self, meta: Meta, children: list[Any]) -> ast.BlockSite:
        return self._block_site(meta, None, children[0], children[1] if len(children) > 1 else ())

    def path_site(self, meta: Meta, children: list[Any]) -> ast.Site:
        path = children[0]
        if len(children) == 1:
            name = ".".join(path)
            if name in ast.NAMED_SITES:
                return ast.NamedSite(name, span=self._span(meta))
            if len(path) == 2 and path[0] in ast.STACKS and path[1] in ast.NAMED_SITES:
                return ast.NamedSite(path[1], span=self._span(meta), stack=path[0])
            if name in ast.LAYER_ALIASES:
                raise Problem(self._span(meta), f"'{name}' needs a layer index", f"write {name}.6 or {name}.N-4")
            return ast.ModuleSite(name, span=self._span(meta))
        container = None if path in [(a,) for a in ast.LAYER_ALIASES] else path
        return self._block_site(meta, container, children[1], children[2] if len(children) > 2 else ())

    def _block_site(self, meta: Meta, container: tuple[str, ...] | None, layers: ast.LayerSelector,
                    sub: tuple[str, ...]) -> ast.BlockSite:
        if (len(sub) == 1 and sub[0] in ast.COMPONENTS) or ".".join(sub) in ast.COMPONENTS:
            return ast.BlockSite(layers, ".".join(sub), (), container, span=self._span(meta))
        component = "module" if sub else "out"
        return ast.BlockSite(layers, component, tuple(sub), container, span=self._span(meta))

    def name_path(self, meta: Meta, children: list[Any]) -> tuple[str, ...]:
        return tuple(c for part in children for c in (part if isinstance(part, tuple) else (str(part),)))

    def sub(self, meta: Meta, children: list[Any]) -> tuple[str, ...]:
        return tuple(str(c) for c in children)

    def index_int(self, meta: Meta, children: list[Any]) -> ast.Index:
        return ast.Index(self._int(children[0], "layer index"), self._span(meta))

    def index_neg(self, meta: Meta, children: list[Any]) -> ast.Index:
        return ast.Index(-self._int(children[1], "layer index"), self._span(meta))

    def index_n(self, meta: Meta, children: list[Any]) -> ast.NIndex:
        offset = 0
        if children:
            offset = self._int(children[1], "offset") * (-1 if children[0] == "-" else 1)
        return ast.NIndex(offset, self._span(meta))

    def index_percent(self, meta: Meta, children: list[Any]) -> ast.PercentIndex:
        percent = float(children[0][:-1])
        if percent > 100:
            raise Problem(self._span(meta), f"{children[0]} is more than 100%", "use a depth between 0% and 100%")
        return ast.PercentIndex(percent, self._span(meta))

    def layer_range(self, meta: Meta, children: list[Any]) -> ast.LayerRange:
        return ast.LayerRange(children[0], children[1], self._span(meta))

    def all_layers(self, meta: Meta, children: list[Any]) -> ast.AllLayers:
        return ast.AllLayers(self._span(meta))

    def layer_set(self, meta: Meta, children: list[Any]) -> ast.LayerSet:
        return ast.LayerSet(tuple(children), self._span(meta))

    def positions(self, meta: Meta, children: list[Any]) -> ast.Positions:
        return replace(children[0], span=self._span(meta))

    def pos_last(self, meta: Meta, children: list[Any]) -> ast.Positions:
        return ast.Positions("last")

    def pos_prompt(self, meta: Meta, children: list[Any]) -> ast.Positions:
        return ast.Positions("prompt")

    def pos_new(self, meta: Meta, children: list[Any]) -> ast.Positions:
        return ast.Positions("new")

    def pos_index(self, meta: Meta, children: list[Any]) -> ast.Positions:
        return ast.Positions("index", self._int(children[0], "position"))

    def pos_neg(self, meta: Meta, children: list[Any]) -> ast.Positions:
        if children[1] != "1":
            raise Problem(
                self._span(meta),
                f"position -{children[1]} is not supported: only -1 (the last position) counts from the end",
                "use [last], [i] or [a:b] with absolute positions",
            )
        return ast.Positions("last")

    def pos_slice(self, meta: Meta, children: list[Any]) -> ast.Positions:
        colon = next(i for i, tok in enumerate(children) if tok.type == "COLON")
        start = self._int(children[0], "position") if colon == 1 else None
        stop = self._int(children[-1], "position") if colon < len(children) - 1 else None
        if start is not None and stop is not None and stop <= start:
            raise Problem(self._span(meta), f"empty position range [{start}:{stop}]", "the end must exceed the start")
        return ast.Positions("slice", start, stop)

    # values ----------------------------------------------------------
    def value_file(self, meta: Meta, children: list[Any]) -> ast.FileValue:
        return _file_value(_unquote(children[0]), self._span(meta))

    def value_bound(self, meta: Meta, children: list[Any]) -> ast.BoundValue:
        return ast.BoundValue(str(children[0]), self._span(meta))

    def source_model(self, meta: Meta, children: list[Any]) -> ast.ModelSource:
        return ast.ModelSource(_unquote(children[0]), False, self._span(meta))

    def source_model_bound(self, meta: Meta, children: list[Any]) -> ast.ModelSource:
        return ast.ModelSource(str(children[0]), True, self._span(meta))

    # ops -------------------------------------------------------------
    def scale(self, meta: Meta, children: list[Any]) -> ast.Scale:
        return ast.Scale(children[0], self._span(meta))

    def add(self, meta: Meta, children: list[Any]) -> ast.Add:
        return ast.Add(children[0], children[1] if len(children) > 1 else None, self._span(meta))

    def add_learn(self, meta: Meta, children: list[Any]) -> ast.Learn:
        init = next((c for c in children if isinstance(c, (ast.FileValue, ast.BoundValue))), None)
        factor = next((c for c in children if isinstance(c, float)), None)
        return ast.Learn(init, factor, self._span(meta))

    def ablate(self, meta: Meta, children: list[Any]) -> ast.Ablate:
        return ast.Ablate(children[0], self._span(meta))

    def zero(self, meta: Meta, children: list[Any]) -> ast.Zero:
        return ast.Zero(self._span(meta))

    def clamp(self, meta: Meta, children: list[Any]) -> ast.Clamp:
        low, high = children
        if low > high:
            raise Problem(self._span(meta), f"clamp bounds are reversed: {low:g} > {high:g}", "write clamp LO HI")
        return ast.Clamp(low, high, self._span(meta))

    def patch(self, meta: Meta, children: list[Any]) -> ast.Patch:
        mix = children[0] if children else None
        if mix is not None and not 0 <= mix <= 1:
            raise Problem(self._span(meta), f"mix must lie in [0, 1], got {mix:g}",
                          "mix 0 keeps the base value, mix 1 takes the source's, mix 0.5 is halfway")
        return ast.Patch(mix, self._span(meta))

    def noise(self, meta: Meta, children: list[Any]) -> ast.Noise:
        std = children[0]
        if std < 0:
            raise Problem(self._span(meta), f"noise std must be non-negative, got {std:g}")
        return ast.Noise(std, len(children) > 1, self._span(meta))

    def always(self, meta: Meta, children: list[Any]) -> bool:
        return True

    def module(self, meta: Meta, children: list[Any]) -> ast.ModuleOp:
        kwargs = children[1] if len(children) > 1 else ()
        return ast.ModuleOp(str(children[0]), kwargs, self._span(meta))

    def kwargs(self, meta: Meta, children: list[Any]) -> tuple[tuple[str, ast.KwargValue], ...]:
        seen: set[str] = set()
        for name, _value, span in children:
            if name in seen:
                raise Problem(span, f"argument '{name}' is given twice")
            seen.add(name)
        return tuple((name, value) for name, value, _ in children)

    def kwarg(self, meta: Meta, children: list[Any]) -> tuple[str, ast.KwargValue, Span]:
        return (str(children[0]), children[1], self._tok(children[0]))

    def lit_string(self, meta: Meta, children: list[Any]) -> str:
        return _unquote(children[0])

    def lit_name(self, meta: Meta, children: list[Any]) -> ast.KwargValue:
        words = {"true": True, "false": False, "none": None}
        if children[0].lower() not in words:
            raise Problem(self._span(meta), f"'{children[0]}' is not a value", "use a number, a quoted string, true, false or none")
        return words[children[0].lower()]

    def blade_method(self, meta: Meta, children: list[Any]) -> str:
        return str(children[0])

    debate_method = project_kind = view_kind = blade_method

    def _clauses(self, children: list[Clause], meta: Meta) -> dict[str, Any]:
        found: dict = {}
        for key, value, span in children:
            if key in found:
                raise Problem(span, f"'{key}' is given twice in one statement", f"keep one '{key}' clause")
            found[key] = value
        return found

    def clause_from(self, meta: Meta, children: list[Any]) -> Clause:
        return ("source", children[0], self._span(meta))

    def clause_project(self, meta: Meta, children: list[Any]) -> Clause:
        return ("project", children[0], self._span(meta))

    def clause_alpha(self, meta: Meta, children: list[Any]) -> Clause:
        return ("alpha", children[0], self._span(meta))

    def clause_layer(self, meta: Meta, children: list[Any]) -> Clause:
        return ("layer", self._int(children[0], "layer"), self._span(meta))

    def clause_views(self, meta: Meta, children: list[Any]) -> Clause:
        return ("views", children[0], self._span(meta))

    def clause_strength(self, meta: Meta, children: list[Any]) -> Clause:
        return ("strength", children[0], self._span(meta))

    def blade(self, meta: Meta, children: list[Any]) -> ast.Blade:
        clauses = self._clauses(children[1:], meta)
        if "layer" in clauses and not isinstance(clauses.get("source"), ast.ModelSource):
            span = next(span for key, _, span in children[1:] if key == "layer")
            raise Problem(span, "`layer K` chooses a live source model's layer, and this blade has none",
                          'take the blade from a model: blade gated from model "path-or-id" layer K')
        return ast.Blade(children[0], **clauses, span=self._span(meta))

    def blade_bare(self, meta: Meta, children: list[Any]) -> ast.Blade:
        return ast.Blade(span=self._span(meta))

    def debate(self, meta: Meta, children: list[Any]) -> ast.Debate:
        clauses = self._clauses(children[1:], meta)
        strength = clauses.get("strength")
        if clauses.get("views") == "dropout" and strength is not None and not 0 <= strength < 1:
            span = next(s for key, _, s in children[1:] if key == "strength")
            raise Problem(span, f"dropout strength {strength:g} is not a probability in [0, 1)",
                          "give the share of values each view drops, e.g. strength 0.1")
        return ast.Debate(children[0], **clauses, span=self._span(meta))

    def bias_experts(self, meta: Meta, children: list[Any]) -> ast.Bias:
        return ast.Bias(children[0], children[1] if len(children) > 1 else None, self._span(meta))

    bias_value = bias_experts

    def mask(self, meta: Meta, children: list[Any]) -> ast.Mask:
        return ast.Mask(children[0], self._span(meta))

    def force(self, meta: Meta, children: list[Any]) -> ast.Force:
        return ast.Force(self._int(children[0], "expert"), self._span(meta))

    def capture(self, meta: Meta, children: list[Any]) -> ast.Capture:
        return ast.Capture(str(children[0]), self._span(meta))

    # SAE features ------------------------------------------------------
    def features(self, meta: Meta, children: list[Any]) -> FeatureSet:
        """`12` or `{12, 40..43}`: the features, and each written item's span (read back from the set's
        text, which int_set has already checked holds only numbers, ranges, commas and spaces)."""
        if isinstance(children[0], Token):
            feature = self._int(children[0], "feature")
            return (feature,), ((feature, feature, self._tok(children[0])),)
        text = self.chunk.text[meta.start_pos:meta.end_pos]
        items = tuple((int(m[1]), int(m[2] or m[1]), _file_span(self.chunk, meta.line, meta.column + m.start(),
                                                                 meta.column + m.end()))
                      for m in _SET_ITEM.finditer(text))
        return children[0], items

    def sae_edit(self, meta: Meta, children: list[Any]) -> tuple[str, float | None]:
        """`add X`, `clamp X`, `scale X` or `zero`: (action, X)."""
        return (str(children[0]), children[1] if len(children) > 1 else None)

    def sae_features(self, meta: Meta, children: list[Any]) -> ast.SaeFeatures:
        value, (features, items), (action, amount) = children
        return ast.SaeFeatures(value, features, action, amount, self._span(meta), items)

    def sae_capture(self, meta: Meta, children: list[Any]) -> ast.SaeCapture:
        return ast.SaeCapture(children[0], str(children[1]), self._span(meta))
