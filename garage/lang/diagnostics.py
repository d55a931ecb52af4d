"""One diagnostic type and one renderer, shared by the parser, resolver, validator, API and CLI.

Errors are collected as values and raised together, so a user sees every problem in a spec at once.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

Severity = Literal["error", "warning"]

DEFAULT_FILENAME = "<spec>"
MAX_SHOWN = 50  # diagnostics rendered in full; the rest are counted
LINE_WINDOW = 200  # characters of a long source line shown around the caret

# The one definition of a line break, used to cut statements and to show source lines alike. Other
# Unicode separators (\v, \f, \x85, \u2028, …) are not line breaks: the parser skips \f and rejects the rest.
LINE_BREAK = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """The lines of a spec, cut at \\n, \\r\\n and \\r only."""
    return LINE_BREAK.split(text)


@dataclass(frozen=True)
class Span:
    """Where a construct sits in its source: 1-based line and columns, end column exclusive."""

    line: int
    column: int
    end_column: int

    def __post_init__(self) -> None:
        if self.end_column <= self.column:
            object.__setattr__(self, "end_column", self.column + 1)


@dataclass(frozen=True)
class Diagnostic:
    """A problem found in a spec, tied to its place in the source."""

    severity: Severity
    message: str
    filename: str = DEFAULT_FILENAME
    line: int = 0
    column: int = 0
    end_column: int = 0
    hint: str | None = None
    rule: str | None = None  # the lint rule that produced a warning, e.g. "blade-depth"
    source_line: str | None = field(default=None, compare=False, repr=False)

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def as_dict(self) -> dict[str, object]:
        """The diagnostic for scripts and editor problem matchers: file, line, column, end, severity,
        message, hint and rule (line and column 0 when it belongs to the whole file)."""
        return {"file": self.filename, "line": self.line, "column": self.column, "end_line": self.line,
                "end_column": max(self.end_column, self.column), "severity": self.severity,
                "message": self.message, "hint": self.hint, "rule": self.rule}

    def render(self) -> str:
        """Compiler-style text: `file:line:col: severity: message`, the source line and a caret."""
        where = f"{self.filename}:{self.line}:{self.column}" if self.line else self.filename
        tag = f" [{self.rule}]" if self.rule else ""
        out = [f"{where}: {self.severity}: {self.message}{tag}"]
        if self.source_line is not None and self.line:
            text = self.source_line.expandtabs(1)
            width = max(1, min(self.end_column, len(text) + 2) - self.column)
            start = max(0, min(self.column - 1 - LINE_WINDOW // 2, len(text) - LINE_WINDOW))
            shown = text[start:start + LINE_WINDOW]
            left, right = ("…" if start else ""), ("…" if start + LINE_WINDOW < len(text) else "")
            width = min(width, LINE_WINDOW - (self.column - 1 - start))
            out.append(f"  {left}{shown}{right}")
            out.append("  " + " " * (len(left) + self.column - 1 - start) + "^" * max(1, width))
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)


class Source:
    """A spec's text and file name, able to make diagnostics that point into it."""

    def __init__(self, text: str, filename: str | None = None) -> None:
        self.text = text
        self.filename = filename or DEFAULT_FILENAME
        self.lines = split_lines(text)

    def line_text(self, line: int) -> str | None:
        return self.lines[line - 1] if 1 <= line <= len(self.lines) else None

    def diagnostic(
        self,
        span: Span | None,
        message: str,
        hint: str | None = None,
        severity: Severity = "error",
        rule: str | None = None,
    ) -> Diagnostic:
        if span is None:
            return Diagnostic(severity, message, self.filename, hint=hint, rule=rule)
        return Diagnostic(
            severity,
            message,
            self.filename,
            span.line,
            span.column,
            span.end_column,
            hint,
            rule,
            self.line_text(span.line),
        )


def render(diagnostics: Iterable[Diagnostic], most: int = MAX_SHOWN) -> str:
    """The first `most` diagnostics in source order, then how many more there are, and a one-line count."""
    diags = sorted(diagnostics, key=lambda d: (d.filename, d.line, d.column))
    if not diags:
        return "no problems found"
    errors = sum(d.is_error for d in diags)
    warnings = len(diags) - errors
    counts = [f"{n} {word}{'s' if n != 1 else ''}" for n, word in ((errors, "error"), (warnings, "warning")) if n]
    shown = [d.render() for d in diags[:most]]
    if len(diags) > most:
        shown.append(f"... and {len(diags) - most} more")
    return "\n".join(shown) + "\n" + ", ".join(counts)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A hint naming the nearest valid word, or None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


class Problem(Exception):
    """One problem at one span, raised inside a stage and turned into a Diagnostic by that stage's loop."""

    def __init__(self, span: Span | None, message: str, hint: str | None = None, severity: Severity = "error",
                 rule: str | None = None) -> None:
        super().__init__(message)
        self.span, self.message, self.hint, self.severity, self.rule = span, message, hint, severity, rule

    def diagnostic(self, source: "Source") -> Diagnostic:
        return source.diagnostic(self.span, self.message, self.hint, self.severity, self.rule)


class GarageError(Exception):
    """Every error caused by user input. Carries all its diagnostics; str() renders them."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = list(diagnostics)
        super().__init__(self.diagnostics)  # rendered only when shown: str() renders

    def __str__(self) -> str:
        return render(self.diagnostics)


class GarageWarning(UserWarning):
    """A lint warning about a spec (the blade rules, dead ops, unchecked shapes), issued when compiling so
    that it shows like other library warnings and can be filtered with the `warnings` module."""


class SpecError(GarageError):
    """The spec text is not valid .garage syntax."""


class ResolveError(GarageError):
    """A site, index, name or expectation does not fit the model."""


class ValidationError(GarageError):
    """Dimensions, files, modules or expectations fail the checks made before anything runs."""


def raise_if_errors(diagnostics: Sequence[Diagnostic], error_type: type[GarageError]) -> None:
    if any(d.is_error for d in diagnostics):
        raise error_type(diagnostics)
