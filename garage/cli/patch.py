"""`garage patch`: an activation patching sweep between a clean and a corrupt prompt, as a table and a heatmap."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..models import load_model_and_tokenizer
from ..patching import POSITIONS, patching
from ..pictures import heatmap, require
from .common import EXIT_OK, add_json, add_model, model_name, step


def add(sub: Any) -> None:
    p = sub.add_parser("patch", help="activation patching: which sites and tokens restore a clean prompt's answer")
    add_model(p)
    p.add_argument("--clean", required=True, help="the clean prompt, e.g. 'The Eiffel Tower is in the city of'")
    p.add_argument("--corrupt", required=True, help="the same prompt with its subject changed")
    p.add_argument("--answer", required=True, help="the clean prompt's answer token, e.g. ' Paris'")
    p.add_argument("--wrong", required=True, help="the corrupt prompt's answer token, e.g. ' Rome'")
    p.add_argument("--sites", default="h.*", help="sites to sweep: h.*, h.*.attn, h.*.mlp, h.*.mlp.hidden, "
                   "h.*.attn.heads, … (default: h.*)")
    p.add_argument("--positions", choices=POSITIONS, default="each",
                   help="a column per token (each), the last token (last), or every token at once (all)")
    p.add_argument("--method", choices=("exact", "attribution"), default="exact",
                   help="run every cell (exact), or estimate every cell from one backward pass (attribution)")
    p.add_argument("-o", "--output", type=Path, metavar="PNG", help="write a heatmap (needs matplotlib)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.output is not None:
        require()  # before the sweep, not after it
    name = model_name(args)
    with step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name)
    with step(f"patching {args.sites} ({args.method})"):
        result = patching(model, args.clean, args.corrupt, sites=args.sites, positions=args.positions,
                          answer=args.answer, wrong=args.wrong, tokenizer=tokenizer, method=args.method)
    if args.output is not None:
        heatmap(result, args.output, f"{name}: {args.clean!r} → {args.answer!r} vs {args.wrong!r}")
    if args.json:
        print(json.dumps({"model": name, "clean": args.clean, "corrupt": args.corrupt, "answer": args.answer,
                          "wrong": args.wrong, **result.as_dict()}, indent=2))
        return EXIT_OK
    print(f"== {name}: logit difference {args.answer!r} − {args.wrong!r}: clean {result.clean:.3f}, "
          f"corrupt {result.corrupt:.3f}; each cell 0 = corrupt, 1 = clean ({args.method})")
    print(result)
    if args.output is not None:
        print(f"wrote {args.output}")
    return EXIT_OK
