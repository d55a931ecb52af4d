"""`garage fmt SPEC`: a spec in canonical form (--check: exit 1 if it is not already)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..lang.formatter import format_spec
from ..lang.parse import load as load_spec
from .common import EXIT_ERRORS, EXIT_OK, add_spec


def add(sub: Any) -> None:
    p = sub.add_parser("fmt", help="print a spec in canonical form")
    add_spec(p, with_model=False)
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not already canonical")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    text = format_spec(spec)
    if args.check:
        return EXIT_OK if text == spec.source.text else EXIT_ERRORS
    sys.stdout.write(text)
    return EXIT_OK
