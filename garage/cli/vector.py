"""`garage vector`: a steering vector from contrasting prompts, as safetensors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import vectors
from ..models import load_model_and_tokenizer
from .common import EXIT_OK, add_model, model_name, prompts, step


def add(sub: Any) -> None:
    p = sub.add_parser("vector", help="make a steering vector from contrasting prompts (safetensors)")
    add_model(p)
    p.add_argument("--site", default="h.10", help="the one site to read, e.g. h.10 or N-4 (default: h.10)")
    p.add_argument("--pos", action="append", default=[], metavar="TEXT", help="a positive prompt (repeatable)")
    p.add_argument("--neg", action="append", default=[], metavar="TEXT", help="a negative prompt (repeatable)")
    p.add_argument("--pos-file", type=Path, metavar="FILE", help="positive prompts, one a line")
    p.add_argument("--neg-file", type=Path, metavar="FILE", help="negative prompts, one a line")
    p.add_argument("--reduce", choices=("mean", "last"), default="mean",
                   help="each prompt's state: the mean over its tokens, or its last token (default: mean)")
    p.add_argument("--method", choices=vectors.METHODS, default="mean",
                   help="mean: mean positive state minus mean negative; pca_diff, pca_center: repeng's PCA "
                        "directions (the i-th positive prompt pairs with the i-th negative); probe: a logistic "
                        "regression's weight (default: mean)")
    p.add_argument("-o", "--output", required=True, type=Path, help="the .safetensors file to write")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    positive, negative = prompts(args.pos, args.pos_file), prompts(args.neg, args.neg_file)
    if not positive or not negative:
        raise ValueError("give positive and negative prompts: --pos/--pos-file and --neg/--neg-file")
    vectors.check_method(args.method, len(positive), len(negative))  # before the model loads
    name = model_name(args)
    with step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name)
    with step(f"reading {args.site} on {len(positive)} positive and {len(negative)} negative prompts"):
        vector = vectors.contrast(model, tokenizer, positive, negative, site=args.site, reduce=args.reduce,
                                   method=args.method)
    made = vectors.metadata(model, args.site, len(positive) + len(negative), args.reduce, args.method)
    path = vectors.save(args.output, vector, **made, source_model=name)
    print(f"{path}: [{vector.shape[0]}] at {made['site']} by {args.method}, norm {vector.norm():.4g}")
    return EXIT_OK
