"""The `garage` command: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import nn
from transformers import GenerationMixin

from . import vectors
from ._version import __version__
from .analyze import compare, effect_table
from .check.validate import check
from .compiler import compile as compile_spec
from .lang.diagnostics import GarageError, GarageWarning
from .lang.formatter import format_spec
from .lang.parse import load as load_spec
from .models import BUILTIN, DEFAULT_MODEL, load_model, load_model_and_tokenizer
from .runtime.injected import InjectedModel

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2


def _add_spec(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    p.add_argument("spec", help="a .garage file")
    if with_model:
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"hub id, local folder, or built-in ({', '.join(BUILTIN)}); default {DEFAULT_MODEL}",
        )


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="garage", description="Compile .garage injection specs against transformer models.")
    top.add_argument("--version", action="version", version=f"garage {__version__}")
    top.add_argument("--debug", action="store_true",
                     help="on an error, also print the underlying traceback (as GARAGE_DEBUG=1 does)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_spec(sub.add_parser("check", help="report every problem in a spec against a model (exit 1 if any error)"))
    _add_spec(sub.add_parser("explain", help="show where each statement lands in the model"))
    run = sub.add_parser("run", help="generate text with the spec compiled into the model")
    _add_spec(run)
    run.add_argument("--prompt", default="The meaning of life is", help="text to continue (default: %(default)r)")
    run.add_argument("--max-new-tokens", type=_count, default=20, metavar="N", help="tokens to generate (default: 20)")
    run.add_argument("--compare", action="store_true",
                     help="also generate without the spec, and show how far the spec moves each layer")
    run.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--seed", type=int, default=0, help="seed for built-in models and sampling (default: 0)")
    run.add_argument("--compile", action="store_true", help="torch.compile the injected graphs (slow to start)")
    vector = sub.add_parser("vector", help="make a steering vector from contrasting prompts (safetensors)")
    vector.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local folder, or built-in; default {DEFAULT_MODEL}")
    vector.add_argument("--site", default="h.10", help="the one site to read, e.g. h.10 or N-4 (default: h.10)")
    vector.add_argument("--pos", action="append", default=[], metavar="TEXT", help="a positive prompt (repeatable)")
    vector.add_argument("--neg", action="append", default=[], metavar="TEXT", help="a negative prompt (repeatable)")
    vector.add_argument("--pos-file", type=Path, metavar="FILE", help="positive prompts, one a line")
    vector.add_argument("--neg-file", type=Path, metavar="FILE", help="negative prompts, one a line")
    vector.add_argument("--reduce", choices=("mean", "last"), default="mean",
                        help="each prompt's state: the mean over its tokens, or its last token (default: mean)")
    vector.add_argument("-o", "--output", required=True, type=Path, help="the .safetensors file to write")
    fmt = sub.add_parser("fmt", help="print a spec in canonical form")
    _add_spec(fmt, with_model=False)
    fmt.add_argument("--check", action="store_true", help="exit 1 if the file is not already canonical")
    return top


def _count(text: str) -> int:
    """A whole number of 0 or more, refused by argparse (exit 2) before anything loads."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def _compile(model: nn.Module, spec: str, **options: Any) -> InjectedModel:
    """compile_spec, with its warnings left to the command, which prints them once itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GarageWarning)
        return compile_spec(model, Path(spec), **options)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _model(name: str) -> nn.Module:
    _progress(f"loading {name} ...")
    return load_model(name)


def _cmd_check(args: argparse.Namespace) -> int:
    model = _model(args.model)
    _progress("checking (tracing the model the first time) ...")
    report = check(model, Path(args.spec))
    print(report)
    return EXIT_ERRORS if report.errors else EXIT_OK


def _cmd_explain(args: argparse.Namespace) -> int:
    model = _model(args.model)
    _progress("compiling ...")
    injected = _compile(model, args.spec)
    print(injected.explain())
    for warning in injected.warnings:
        print(warning.render(), file=sys.stderr)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    _progress(f"loading {args.model} ...")
    model, tokenizer = load_model_and_tokenizer(args.model, seed=args.seed)
    _progress("checking and compiling the spec (tracing the model) ...")
    injected = _compile(model, args.spec, compile=args.compile)
    for warning in injected.warnings:
        print(warning.render(), file=sys.stderr)
    inputs = tokenizer([args.prompt], return_tensors="pt")
    generation = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)

    def text(tokens: torch.Tensor) -> str:
        return str(tokenizer.decode(tokens[0], skip_special_tokens=True))

    _progress("generating ...")
    torch.manual_seed(args.seed)
    print(f"== with {args.spec}")
    print(text(injected.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], **generation)))
    if args.compare:
        torch.manual_seed(args.seed)
        with torch.no_grad():
            generator = cast(GenerationMixin, model)  # `run` has generated already: it is a causal LM
            plain = generator.generate(**inputs, **generation, pad_token_id=tokenizer.pad_token_id)
        print("== without")
        print(text(plain))
        print("== how far the spec moves each layer (on the prompt)")
        print(effect_table(compare(model, injected.plan.spec, dict(inputs))))
    return EXIT_OK


def _prompts(texts: list[str], path: Path | None) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines() if path is not None else []
    return [*texts, *(line for line in lines if line.strip())]


def _cmd_vector(args: argparse.Namespace) -> int:
    positive, negative = _prompts(args.pos, args.pos_file), _prompts(args.neg, args.neg_file)
    if not positive or not negative:
        raise ValueError("give positive and negative prompts: --pos/--pos-file and --neg/--neg-file")
    _progress(f"loading {args.model} ...")
    model, tokenizer = load_model_and_tokenizer(args.model)
    _progress(f"reading {args.site} on {len(positive)} positive and {len(negative)} negative prompts ...")
    vector = vectors.contrast(model, tokenizer, positive, negative, site=args.site, reduce=args.reduce)
    made = vectors.metadata(model, args.site, len(positive) + len(negative), args.reduce)
    path = vectors.save(args.output, vector, **made, source_model=args.model)
    print(f"{path}: [{vector.shape[0]}] at {made['site']}, norm {vector.norm():.4g}")
    return EXIT_OK


def _cmd_fmt(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    text = format_spec(spec)
    if args.check:
        return EXIT_OK if text == spec.source.text else EXIT_ERRORS
    sys.stdout.write(text)
    return EXIT_OK


COMMANDS = {"check": _cmd_check, "explain": _cmd_explain, "run": _cmd_run, "vector": _cmd_vector, "fmt": _cmd_fmt}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.debug:
        os.environ["GARAGE_DEBUG"] = "1"
    debug = bool(os.environ.get("GARAGE_DEBUG"))
    try:
        return COMMANDS[args.command](args)
    except GarageError as err:
        if debug and err.__cause__ is not None:
            traceback.print_exception(err.__cause__, file=sys.stderr)
        print(err, file=sys.stderr)
        return EXIT_ERRORS
    except (OSError, ValueError) as err:
        if debug:
            traceback.print_exception(err, file=sys.stderr)
        print(f"garage: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
