"""`garage analyze`: per-layer statistics of a model's hidden states on a prompt."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..analyze import capture
from ..models import load_model_and_tokenizer
from .common import EXIT_OK, add_json, add_model, model_name, step


def add(sub: Any) -> None:
    p = sub.add_parser("analyze", help="per-layer statistics of a model's hidden states on a prompt")
    add_model(p)
    p.add_argument("--prompt", default="I think my neighbour is", help="text to run (default: %(default)r)")
    p.add_argument("--layers", help="comma-separated blocks or sites, e.g. 0,6,11 or h.6.mlp (default: every block)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    name = model_name(args)
    with step(f"loading {name}"):
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
