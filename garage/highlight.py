"""Syntax highlighting of `.garage` specs: a Pygments lexer, registered as `garage` through the
`pygments.lexers` entry point, so that Sphinx, MkDocs, `rich` and `pygmentize` colour specs by name.

Its keywords are read from the grammar itself (every quoted word in `garage.lark`), so a keyword added to
the language is highlighted without touching this file. Statement words (`at`, `expect`) and op names
are keywords; clause words (`from`, `alpha`, `views`, …) and methods (`gated`, `topk`, …) are
pseudo-keywords; `h` and `N` in sites are built-in names. Needs Pygments (pytest and rich depend on it).
"""

from __future__ import annotations

import re
from importlib import resources

from pygments.lexer import RegexLexer, words
from pygments.token import (
    Comment,
    Keyword,
    Name,
    Number,
    Operator,
    Punctuation,
    String,
    Whitespace,
)

from .lang.spec import OP_KEYWORDS

STATEMENTS = ("at", "expect")


def grammar_words() -> list[str]:
    """Every quoted word of the grammar: the language's keywords."""
    text = resources.files("garage.lang").joinpath("grammar/garage.lark").read_text(encoding="utf-8")
    return sorted(set(re.findall(r'"([a-z_]+)"', text)))


class GarageLexer(RegexLexer):
    """The `.garage` injection language."""

    name = "garage"
    aliases = ["garage"]
    filenames = ["*.garage"]
    mimetypes = ["text/x-garage"]

    _other = [w for w in grammar_words() if w not in STATEMENTS and w not in OP_KEYWORDS]
    tokens = {
        "root": [
            (r"#.*$", Comment.Single),
            (r"\s+", Whitespace),
            (r'"(\\\\|\\"|[^"\\\n])*"', String.Double),
            (words(STATEMENTS, prefix=r"\b", suffix=r"\b"), Keyword.Declaration),
            (words(OP_KEYWORDS, prefix=r"\b", suffix=r"\b"), Keyword),
            (words(_other, prefix=r"\b", suffix=r"\b"), Keyword.Pseudo),
            (r"\b[hN]\b", Name.Builtin),
            (r"[+-]?(\d+\.\d+|\d+)([eE][+-]?\d+)?", Number),
            (r"\.\.|[*=+\-]", Operator),
            (r"[\[\]{}(),;:.]", Punctuation),
            (r"[A-Za-z_]\w*", Name),
        ],
    }
