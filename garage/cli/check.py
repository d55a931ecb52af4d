"""`garage check SPEC`: every problem in a spec against a model (exit 1 if any is an error)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..check.validate import check
from .common import (
    EXIT_ERRORS,
    EXIT_OK,
    add_json,
    add_spec,
    diagnostics_json,
    model,
    step,
)


def add(sub: Any) -> None:
    p = sub.add_parser("check", help="report every problem in a spec against a model (exit 1 if any error)")
    add_spec(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    loaded = model(args)
    with step("checking (tracing the model the first time)"):
        report = check(loaded, Path(args.spec))
    print(diagnostics_json(report.diagnostics) if args.json else report)
    return EXIT_ERRORS if report.errors else EXIT_OK
