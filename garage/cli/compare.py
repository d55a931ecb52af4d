"""`garage compare A B`: two models side by side, and whether blades and blocks can pass between them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..analyze import compare_models
from ..models import load_model_and_tokenizer
from .common import EXIT_OK, MODEL_HELP, add_json, step


def add(sub: Any) -> None:
    p = sub.add_parser("compare", help="two models side by side, and whether blades and blocks can pass between them")
    p.add_argument("model_a", help=MODEL_HELP)
    p.add_argument("model_b", help="the other model, named the same ways")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    loaded = []
    for name in (args.model_a, args.model_b):
        with step(f"loading {name}"):
            loaded.append(load_model_and_tokenizer(name)[0])
    comparison = compare_models(*loaded)
    if args.json:
        facts = {what: {args.model_a: a, args.model_b: b} for what, a, b in comparison.facts}
        print(json.dumps({"models": [args.model_a, args.model_b], "facts": facts,
                          "verdicts": dict(comparison.verdicts)}, indent=2))
        return EXIT_OK
    print(comparison.table((args.model_a, args.model_b)))
    return EXIT_OK
