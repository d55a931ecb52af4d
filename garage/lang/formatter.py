"""Spec → canonical text: one statement a line, one spelling for every construct.

Canonical choices: the alias `h` for blocks (a bare index becomes `h.I`), `.out` left implicit, numbers
in Python's shortest round-tripping form without a trailing `.0`, clauses in grammar order, and file
paths always quoted. parse(format(spec)) == spec for every spec.
"""

from __future__ import annotations

from decimal import Decimal
from functools import singledispatch

from . import spec as ast
from .diagnostics import split_lines


def format_number(x: float) -> str:
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def format_plain_number(x: float) -> str:
    """A number without an exponent (`0.00001`, not `1e-05`), as percentages must be written."""
    text = format_number(x)
    if "e" not in text:
        return text
    plain = format(Decimal(repr(float(x))), "f")
    return plain.rstrip("0").rstrip(".") if "." in plain else plain


def format_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------ layers and positions
@singledispatch
def format_layers(sel: object) -> str:
    raise TypeError(f"not a layer selector: {sel!r}")


@format_layers.register
def _(sel: ast.Index) -> str:
    return str(sel.value)


@format_layers.register
def _(sel: ast.NIndex) -> str:
    return "N" if sel.offset == 0 else f"N{sel.offset:+d}"


@format_layers.register
def _(sel: ast.PercentIndex) -> str:
    return f"{format_plain_number(sel.percent)}%"


@format_layers.register
def _(sel: ast.LayerRange) -> str:
    return f"{format_layers(sel.start)}..{format_layers(sel.end)}"


@format_layers.register
def _(sel: ast.AllLayers) -> str:
    return "*"


@format_layers.register
def _(sel: ast.LayerSet) -> str:
    return "{" + ", ".join(format_layers(item) for item in sel.items) + "}"


def format_positions(pos: ast.Positions | None) -> str:
    if pos is None:
        return ""
    if pos.kind == "index":
        return f"[{pos.start}]"
    if pos.kind == "slice":
        start = "" if pos.start is None else str(pos.start)
        stop = "" if pos.stop is None else str(pos.stop)
        return f"[{start}:{stop}]"
    return f"[{pos.kind}]"


# ------------------------------------------------------------------ sites
def format_site(site: ast.Site) -> str:
    if isinstance(site, ast.BlockSite):
        container = ".".join(site.container) if site.container else "h"
        text = f"{container}.{format_layers(site.layers)}"
        if site.subpath:
            text += "." + ".".join(site.subpath)
        elif site.component != "out":
            text += f".{site.component}"
        if site.heads is not None:
            text += format_int_set(site.heads)
    elif isinstance(site, ast.NamedSite):
        text = f"{site.stack}.{site.name}" if site.stack else site.name
    else:
        text = format_string(site.path)
    return text + format_positions(site.positions)


def format_int_set(items: tuple[int, ...]) -> str:
    """`{0, 1, 2, 5}` → `{0..2, 5}`: runs of three or more become ranges."""
    parts: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts += [f"{items[i]}..{items[j]}"] if j - i >= 2 else [str(x) for x in items[i:j + 1]]
        i = j + 1
    return "{" + ", ".join(parts) + "}"


# ------------------------------------------------------------------ ops
def format_value(value: ast.BladeSource) -> str:
    if isinstance(value, ast.BoundValue):
        return value.name
    if isinstance(value, ast.ModelSource):
        return f"model {value.ref if value.bound else format_string(value.ref)}"
    return format_string(value.path + (f"#{value.key}" if value.key else ""))


def _format_kwarg(value: ast.KwargValue) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "none"}[value]
    if isinstance(value, str):
        return format_string(value)
    return format_number(value)


def format_op(op: ast.Op) -> str:
    words = [op.keyword]
    if isinstance(op, ast.Scale):
        words.append(format_number(op.factor))
    elif isinstance(op, ast.Learn):
        words.append("learn")
        if op.init is not None:
            words += ["from", format_value(op.init)]
        if op.factor is not None:
            words += ["*", format_number(op.factor)]
    elif isinstance(op, (ast.Add, ast.Ablate)):
        words.append(format_value(op.value))
        if isinstance(op, ast.Add) and op.factor is not None:
            words += ["*", format_number(op.factor)]
    elif isinstance(op, ast.Clamp):
        words += [format_number(op.low), format_number(op.high)]
    elif isinstance(op, ast.Patch):
        words += ["from", "source"] + (["mix", format_number(op.mix)] if op.mix is not None else [])
    elif isinstance(op, ast.Noise):
        words.append(format_number(op.std))
        if op.always:
            words.append("always")
    elif isinstance(op, ast.ModuleOp):
        args = ", ".join(f"{k}={_format_kwarg(v)}" for k, v in op.kwargs)
        words.append(op.name + (f"({args})" if args else ""))
    elif isinstance(op, ast.Blade):
        if op.method is not None:
            words.append(op.method)
        if op.source is not None:
            words += ["from", format_value(op.source)]
        if op.layer is not None:
            words += ["layer", str(op.layer)]
        if op.project is not None:
            words += ["project", op.project]
        if op.alpha is not None:
            words += ["alpha", format_number(op.alpha)]
    elif isinstance(op, ast.Debate):
        words.append(op.method)
        if op.views is not None:
            words += ["views", op.views]
        if op.strength is not None:
            words += ["strength", format_number(op.strength)]
    elif isinstance(op, ast.Bias):
        words.append(format_int_set(op.experts) if isinstance(op.experts, tuple) else format_value(op.experts))
        if op.factor is not None:
            words += ["*", format_number(op.factor)]
    elif isinstance(op, ast.Mask):
        words.append(format_int_set(op.experts))
    elif isinstance(op, ast.Force):
        words.append(str(op.expert))
    elif isinstance(op, ast.SaeFeatures):
        chosen = str(op.features[0]) if len(op.features) == 1 else format_int_set(op.features)
        words += [format_value(op.value), "feature", chosen, op.action]
        if op.amount is not None:
            words.append(format_number(op.amount))
    elif isinstance(op, ast.SaeCapture):
        words += [format_value(op.value), "capture", op.name]
    elif isinstance(op, ast.Capture):
        words.append(op.name)
    return " ".join(words)


def format_statement(stmt: ast.Statement) -> str:
    if isinstance(stmt, ast.Expect):
        value = format_string(stmt.value) if isinstance(stmt.value, str) else str(stmt.value)
        return f"expect {stmt.key} {value}"
    text = f"at {format_site(stmt.site)} {format_op(stmt.op)}"
    return text if stmt.when is None else f"{text} {format_condition(stmt.when)}"


def format_condition(when: ast.Condition) -> str:
    """`when SITE @ VALUE > F [soft T]`."""
    text = f"when {format_site(when.site)} @ {format_value(when.value)} {when.compare} {format_number(when.threshold)}"
    return text + (f" soft {format_number(when.soft)}" if when.soft is not None else "")


def format_spec(spec: ast.Spec) -> str:
    """Canonical text of a spec: one statement a line, ending with a newline (empty for an empty spec).

    What the source says beyond its meaning is kept: full-line comments, trailing comments (after the
    last statement of their line, two spaces before the `#`), and blank lines between groups (several
    become one). Statements that did not come from the source (no line in it) follow in order."""
    lines = split_lines(spec.source.text) if spec.source.text else []
    on_line: dict[int, list[str]] = {}
    unplaced: list[str] = []
    for stmt in spec:
        line = stmt.span.line
        (on_line.setdefault(line, []) if 1 <= line <= len(lines) else unplaced).append(format_statement(stmt))
    comment_on = {c.line: c.text for c in spec.comments if 1 <= c.line <= len(lines)}
    out: list[str] = []
    blank = False
    for number, raw in enumerate(lines, start=1):
        statements, comment = on_line.get(number, []), comment_on.get(number)
        if not statements and comment is None:
            blank = blank or (not raw.strip() and bool(out))
            continue
        if blank:
            out.append("")
            blank = False
        if statements:
            out += statements[:-1] + [statements[-1] + (f"  {comment}" if comment else "")]
        else:
            out.append(comment or "")
    out += unplaced
    return "".join(line + "\n" for line in out)
