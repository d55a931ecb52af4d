"""Text → Spec. Lark parses one statement at a time, so every bad statement is reported, not just the first."""

from __future__ import annotations

import os
import stat
from functools import lru_cache
from typing import Iterator

from lark import Lark
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from . import spec as ast
from .diagnostics import (
    Diagnostic,
    Problem,
    Source,
    Span,
    SpecError,
    did_you_mean,
    raise_if_errors,
    split_lines,
)
from .formatter import format_string
from .to_ast import Chunk, ToAst


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark.open_from_package(
        "garage.lang", "garage.lark", ("grammar",), parser="lalr", propagate_positions=True, maybe_placeholders=False
    )


# ------------------------------------------------------------------ splitting into statements
def _statements(text: str, comments: list[ast.Comment] | None = None) -> Iterator[Chunk]:
    """Cut text at line breaks and `;` that lie outside strings, dropping blank chunks. Comments are left
    out of the chunks, and appended to `comments` when it is given (the formatter keeps them).

    A string never spans lines (the grammar forbids it), so an unterminated one ends at its line break and
    the parser reports it there.
    """
    for line_no, line in enumerate(split_lines(text), start=1):
        start, in_string, escaped = 0, False, False
        for col, ch in enumerate(line):
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in ";#":
                if line[start:col].strip():
                    yield Chunk(line[start:col], line_no, start + 1)
                start = col + 1
                if ch == "#":
                    if comments is not None:
                        comments.append(ast.Comment(line_no, col + 1, line[col:].rstrip()))
                    start = len(line)
                    break
        if line[start:].strip():
            yield Chunk(line[start:], line_no, start + 1)


# ------------------------------------------------------------------ syntax errors
_TERMINAL_WORDS = {
    "NAME": "a name",
    "STRING": "a quoted string",
    "INT": "an integer",
    "FLOAT": "a number",
    "PERCENT": "a percentage",
    "$END": "the end of the statement",
}


def _describe(terminal: str) -> str:
    if terminal in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[terminal]
    for term in _parser().terminals:
        if term.name == terminal:
            return f"'{term.pattern.value}'" if term.pattern.type == "str" else term.name.lower()
    return terminal.lower()


def _listing(terminals: set[str]) -> list[str]:
    """Readable names of the expected terminals; a sign and digits read as one "a number"."""
    if {"INT", "FLOAT"} <= terminals:
        terminals = terminals - {"INT", "PLUS", "MINUS"}
    return sorted({_describe(t) for t in terminals})


def _keywords(terminals: set[str]) -> dict[str, str]:
    """The keyword terminals among `terminals`, as name → spelling."""
    return {
        t.name: t.pattern.value
        for t in _parser().terminals
        if t.name in terminals and t.pattern.type == "str" and t.pattern.value.isalpha()
    }


_OP_TERMINALS = {k.upper() for k in ast.OP_KEYWORDS}


def _syntax_diagnostic(err: UnexpectedInput, chunk: Chunk, source: Source) -> Diagnostic:
    expected = set(err.interactive_parser.accepts()) if getattr(err, "interactive_parser", None) else set()
    if not expected:
        expected = set(getattr(err, "allowed", None) or getattr(err, "expected", None) or ())
    column = chunk.column + err.column - 1
    line = chunk.line + err.line - 1
    keywords = _keywords(expected)

    if isinstance(err, UnexpectedToken) and err.token.type == "$END":
        end = chunk.column + len(chunk.text.rstrip())
        what = " or ".join(_listing(expected - {"$END"})) or "more"
        return source.diagnostic(Span(line, end, end + 1), f"incomplete statement: expected {what}")

    if isinstance(err, UnexpectedCharacters):
        found, width = chunk.text[err.column - 1], 1
        if found == '"':
            width = len(chunk.text) - err.column + 1
            message, hint = "unterminated string", 'close the string with " on the same line'
        else:
            message, hint = f"unexpected character '{found}'", None
    else:
        found = str(getattr(err, "token", ""))
        width = max(1, len(found))
        message, hint = f"unexpected '{found}'", None
        if found.isidentifier() and keywords:
            hint = did_you_mean(found, keywords.values())
            if _OP_TERMINALS <= expected:
                message = f"unknown op '{found}'"
            elif expected <= {"AT", "EXPECT"}:
                message = f"unknown statement '{found}': a statement starts with 'at' or 'expect'"
            else:
                message = f"unknown word '{found}'"
    if message.startswith("unknown op"):
        expected = _OP_TERMINALS
    listed = _listing(expected)
    hint = hint or (f"expected {', '.join(listed)}" if listed else None)
    if hint and listed and not hint.startswith("expected"):
        hint += f" (expected {', '.join(listed)})"
    return source.diagnostic(Span(line, column, column + width), message, hint)


# ------------------------------------------------------------------ entry points
BOM = "\ufeff"


def parse_collect(text: str, filename: str | os.PathLike | None = None) -> tuple[ast.Spec, list[Diagnostic]]:
    """The spec of every statement that parses, and a diagnostic for each that does not."""
    if not isinstance(text, str):
        raise TypeError(f"garage.parse takes spec text (str), not {type(text).__name__}")
    text = text.removeprefix(BOM)  # an editor's byte-order mark is not part of the spec
    source = Source(text, os.fspath(filename) if filename is not None else None)
    statements: list[ast.Statement] = []
    diagnostics: list[Diagnostic] = []
    comments: list[ast.Comment] = []
    for chunk in _statements(text, comments):
        try:
            tree = _parser().parse(chunk.text)
            statements.append(ToAst(chunk).transform(tree))
        except UnexpectedInput as err:
            diagnostics.append(_syntax_diagnostic(err, chunk, source))
        except VisitError as err:
            if not isinstance(err.orig_exc, Problem):
                raise
            diagnostics.append(err.orig_exc.diagnostic(source))
    return ast.Spec(tuple(statements), source, tuple(comments)), diagnostics


def parse(text: str, filename: str | os.PathLike | None = None) -> ast.Spec:
    """Parse spec text into a Spec. Raises SpecError carrying every syntax error in the text."""
    spec, diagnostics = parse_collect(text, filename)
    raise_if_errors(diagnostics, SpecError)
    return spec


def parse_site(text: str) -> tuple[ast.Site, Source]:
    """A site written alone ("h.6.mlp", "N-4", "h.*", "transformer.h.6"), or any module path, which is
    quoted for the parser when it is not valid site syntax. Raises SpecError if it is neither."""
    try:
        spec = parse(f"at {text} zero")
    except SpecError:
        spec = parse(f"at {format_string(text)} zero")
    statement = spec.statements[0]
    assert isinstance(statement, ast.At)
    return statement.site, spec.source


MAX_SPEC_BYTES = 1 << 20  # a spec is text a person writes; a larger file is a mistake


def read_spec_file(path: str | os.PathLike[str]) -> str:
    """The text of a .garage file; an unreadable file is a SpecError naming the file. Only a regular file
    is opened (a pipe would block, a device would never end), and at most MAX_SPEC_BYTES are read."""
    name = os.fspath(path)

    def refuse(reason: str, hint: str = "check the path") -> SpecError:
        return SpecError([Diagnostic("error", f"cannot read spec file: {reason}", name, hint=hint)])

    try:
        info = os.stat(name)
        if not stat.S_ISREG(info.st_mode):
            raise refuse("not a regular file", "name a .garage file, not a folder, pipe or device")
        if info.st_size > MAX_SPEC_BYTES:
            raise refuse(f"{info.st_size:,} bytes is too large for a spec", f"specs are at most {MAX_SPEC_BYTES:,} bytes")
        with open(name, encoding="utf-8") as f:
            return f.read(MAX_SPEC_BYTES + 1)[:MAX_SPEC_BYTES]
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise refuse(reason) from None


def load(path: str | os.PathLike[str]) -> ast.Spec:
    """Read a .garage file and parse it."""
    return parse(read_spec_file(path), os.fspath(path))
