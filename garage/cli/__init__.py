"""The `garage` command: one module per command, each parsing its arguments and printing what the library
returns; the work is done by the library.

May import: every other part of garage.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Sequence

from .._version import __version__
from ..lang.diagnostics import GarageError
from . import (
    analyze,
    blade,
    cache,
    check,
    compare,
    explain,
    export,
    fmt,
    patch,
    run,
    sae,
    serve,
    sweep,
    train,
    vector,
)
from .common import EXIT_ERRORS, EXIT_USAGE, diagnostics_json, library_progress

COMMANDS = (check, explain, run, serve, train, analyze, patch, sweep, compare, vector, export, sae, blade, fmt, cache)  # in `--help` order


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="garage", description="Compile .garage injection specs against transformer models.")
    top.add_argument("--version", action="version", version=f"garage {__version__}")
    top.add_argument("--debug", action="store_true",
                     help="on an error, also print the underlying traceback (as GARAGE_DEBUG=1 does)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    args, passed_on = top.parse_known_args(argv)
    if passed_on and not getattr(args, "passes_on", False):  # only `serve` passes arguments on (to vLLM)
        top.error(f"unrecognized arguments: {' '.join(passed_on)}")
    args.passed_on = passed_on
    if args.debug:
        os.environ["GARAGE_DEBUG"] = "1"
    debug = bool(os.environ.get("GARAGE_DEBUG"))
    try:
        with library_progress():
            return int(args.run(args))
    except GarageError as err:
        if debug and err.__cause__ is not None:
            traceback.print_exception(err.__cause__, file=sys.stderr)
        if getattr(args, "json", False):  # a script or an editor reads stdout: the diagnostics go there
            print(diagnostics_json(err.diagnostics))
        else:
            print(err, file=sys.stderr)
        return EXIT_ERRORS
    except (OSError, ValueError) as err:
        if debug:
            traceback.print_exception(err, file=sys.stderr)
        print(f"garage: error: {err}", file=sys.stderr)
        return EXIT_USAGE


__all__ = ["COMMANDS", "main", "parser"]
