"""`garage export`: the vectors a spec adds, as a repeng/llama.cpp control vector or lm-eval's steer config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .. import interop
from .common import EXIT_OK, add_json, add_spec, compiled, model, print_warnings, step

FORMATS_HELP = ("gguf: a control vector for llama.cpp (--control-vector) and repeng, direction.K added at h.K; "
                "lm-eval: the steer config of lm-eval's `steered` model (a .pt of hookpoints)")


def add(sub: Any) -> None:
    p = sub.add_parser("export", help="write a spec's steering vectors for llama.cpp/repeng (gguf) or lm-eval")
    add_spec(p)
    p.add_argument("--to", required=True, choices=interop.FORMATS, help=FORMATS_HELP)
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="the .gguf file; for lm-eval a folder (steer.pt is written in it) or a .pt file")
    p.add_argument("--skip-unsupported", action="store_true",
                   help="leave out, with a warning, statements the format cannot express (default: refuse them)")
    p.add_argument("--params", type=Path, metavar="FILE", help="learned parameters for the spec (garage train)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    loaded = model(args)
    with step(f"compiling {args.spec}"):
        injected = compiled(loaded, args.spec, params=args.params)
    print_warnings(injected)
    written = interop.export(injected, args.to, args.output, skip_unsupported=args.skip_unsupported)
    for skipped in written.skipped:
        print(skipped.render(), file=sys.stderr)
    if args.json:
        print(json.dumps(written.as_dict(), indent=2))
        return EXIT_OK
    what = "a control vector" if written.format == "gguf" else "lm-eval's steer config"
    count = f"{len(written.vectors)} {'direction' if written.format == 'gguf' else 'hookpoint'}"
    print(f"{written.path}: {what} for {written.model_type}, {count}{'s' if len(written.vectors) != 1 else ''}")
    width = max(len(v.name) for v in written.vectors)
    for vector in written.vectors:
        scaled = "" if vector.coefficient == 1 else f" × {vector.coefficient:g}"
        print(f"  {vector.name:<{width}}  at {vector.site}{scaled}, norm {vector.norm:.4g}, "
              f"from {', '.join(vector.statements)}")
    if written.format == "lm-eval":
        print(f"use it: lm_eval --model steered --model_args pretrained=MODEL,steer_path={written.path}")
    return EXIT_OK
