"""`garage train SPEC --data FILE -o OUT`: learn the spec's own parameters, with the model frozen."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..models import load_model_and_tokenizer
from ..training import Record, read_examples, train
from .common import EXIT_OK, add_spec, compiled, count, model_name, print_warnings, step


def add(sub: Any) -> None:
    p = sub.add_parser("train", help="learn the spec's gates, projections and `add learn` vectors from text")
    add_spec(p)
    p.add_argument("--data", required=True, type=Path, metavar="FILE",
                   help=".txt (one text a line) or .jsonl ({\"text\": …} or {\"prompt\": …, \"completion\": …} a line)")
    p.add_argument("--eval", type=Path, metavar="FILE", help="held-out examples, in the same forms")
    p.add_argument("--steps", type=count, default=100, metavar="N", help="optimizer steps (default: 100)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default: 0.01)")
    p.add_argument("--batch-size", type=count, default=8, metavar="N", help="examples a step (default: 8)")
    p.add_argument("--max-length", type=count, default=128, metavar="N", help="tokens an example (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for built-in models and batches (default: 0)")
    p.add_argument("-o", "--output", required=True, type=Path, help="the .safetensors file of learned parameters")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    data = read_examples(args.data)
    held_out = read_examples(args.eval) if args.eval else None
    name = model_name(args)
    with step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name, seed=args.seed)
    with step("checking and compiling the spec"):
        injected = compiled(model, args.spec)
    print_warnings(injected)
    bar = tqdm(total=args.steps, desc="step", file=sys.stderr, dynamic_ncols=True,
               bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {postfix} [{elapsed}<{remaining}]")
    shown: dict[str, str] = {}

    def progress(record: Record) -> None:
        shown["loss"] = f"{record.loss:.4f}"
        if record.eval_loss is not None:
            shown["eval"] = f"{record.eval_loss:.4f}"
        bar.set_postfix(shown, refresh=False)
        bar.update(record.step - bar.n)

    with bar:
        history = train(injected, data, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                        max_length=args.max_length, eval_data=held_out, seed=args.seed, tokenizer=tokenizer,
                        on_step=progress)
    path = injected.save_params(args.output)
    done = len(history.records)
    if history.interrupted:
        print(f"interrupted after {done} of {args.steps} steps", file=sys.stderr)
    last = history.records[-1] if history.records else None
    summary = f"loss {history.losses[0]:.4f} → {last.loss:.4f}" if last else "no step ran"
    tensors = list(injected.parameters())
    print(f"{path}: {sum(p.numel() for p in tensors)} learned values in {len(tensors)} tensors after {done} steps, "
          f"{summary}")
    return EXIT_OK
