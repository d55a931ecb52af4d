"""`garage sweep`: a steering curve, the effect and the damage of one statement's strength over a range."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..models import load_model_and_tokenizer
from ..pictures import curves, require
from ..steering import coefficient_range, strength_sweep
from .common import EXIT_OK, add_json, add_spec, model_name, step


def add(sub: Any) -> None:
    p = sub.add_parser("sweep", help="a steering curve: effect and damage of a statement's strength over a range")
    add_spec(p)
    p.add_argument("--coefficients", required=True, metavar="LO..HI:STEP",
                   help="the strengths to try: LO..HI:STEP (e.g. -8..8:1) or a list (-4,0,4)")
    p.add_argument("--statement", type=int, metavar="LINE",
                   help="the line of the statement whose strength is swept (default: the only one with a strength)")
    p.add_argument("-o", "--output", type=Path, metavar="PNG", help="write the curves (needs matplotlib)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    coefficients = coefficient_range(args.coefficients)
    if args.output is not None:
        require()  # before the sweep, not after it
    name = model_name(args)
    with step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name)
    with step(f"sweeping {len(coefficients)} coefficients"):
        sweep = strength_sweep(model, Path(args.spec), coefficients, tokenizer=tokenizer, statement=args.statement)
    if args.output is not None:
        curves(sweep, args.output, f"{name}: {args.spec}, {sweep.statement}")
    if args.json:
        print(json.dumps({"model": name, "spec": args.spec, **sweep.as_dict()}, indent=2))
        return EXIT_OK
    print(f"== {name}: {args.spec}, strength of {sweep.statement}; effect = log p(good) − log p(bad) of the next "
          "word, damage = held-out perplexity and KL from the plain model")
    print(sweep)
    if args.output is not None:
        print(f"wrote {args.output}")
    return EXIT_OK
