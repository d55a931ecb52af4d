"""`garage explain SPEC`: where each statement lands in the model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import EXIT_OK, add_json, add_spec, compiled, model, print_warnings, step


def add(sub: Any) -> None:
    p = sub.add_parser("explain", help="show where each statement lands in the model")
    add_spec(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    loaded = model(args)
    with step("compiling"):
        injected = compiled(loaded, args.spec)
    if args.json:
        print(json.dumps({"rows": injected.explain_rows(), "warnings": [w.as_dict() for w in injected.warnings]},
                         indent=2))
        return EXIT_OK
    print(injected.explain())
    print_warnings(injected)
    return EXIT_OK
