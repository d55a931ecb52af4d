"""Stage 1, the language: text → Spec. The grammar, the typed AST, the parser, the formatter, and the one
Diagnostic type with its renderer (which every later stage uses to report problems).

Knows nothing of models. May import: garage._compat (nothing else from garage), lark.
"""
