"""Editor support: the Pygments lexer (found by name through its entry point) and the TextMate grammar
both know every keyword of the grammar, and colour a spec as a reader expects."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import Comment, Keyword, Name, Number, String

ROOT = Path(__file__).resolve().parent.parent
KEYWORDS = sorted(set(re.findall(r'"([a-z_]+)"', (ROOT / "garage/lang/grammar/garage.lark").read_text())))


def tokens(text: str) -> list[tuple[object, str]]:
    return [(kind, value) for kind, value in get_lexer_by_name("garage").get_tokens(text) if value.strip()]


def test_the_lexer_is_registered_and_colours_a_spec():
    assert type(get_lexer_for_filename("steer.garage")).__name__ == "GarageLexer"
    got = tokens('at h.6.mlp[last] add steer * 2  # push\nat N-4 blade gated from "b.safetensors" alpha 0.2')
    assert got[:4] == [(Keyword.Declaration, "at"), (Name.Builtin, "h"), (got[2][0], "."), (Number, "6")]
    kinds = dict((value, kind) for kind, value in got)
    assert kinds["add"] is Keyword and kinds["steer"] is Name and kinds["# push"] is Comment.Single
    assert kinds["gated"] is Keyword.Pseudo and kinds['"b.safetensors"'] is String.Double and kinds["0.2"] is Number


def test_every_grammar_keyword_is_a_keyword_to_both_highlighters():
    for word in KEYWORDS:
        assert tokens(word)[0][0] in Keyword, word
    grammar = json.loads((ROOT / "editors/garage.tmLanguage.json").read_text())
    assert grammar["scopeName"] == "source.garage" and grammar["fileTypes"] == ["garage"]
    keyword_patterns = [re.compile(p["match"]) for p in grammar["patterns"] if p["name"].startswith("keyword.")
                        and "match" in p]
    missing = [w for w in KEYWORDS if not any(p.fullmatch(w) for p in keyword_patterns)]
    assert not missing, f"editors/garage.tmLanguage.json lacks keywords: {missing}"
