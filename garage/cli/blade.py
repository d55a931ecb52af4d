"""`garage blade extract | info`: make a blade from a source model, or show what a blade file records."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import blades
from ..models import load_model_and_tokenizer
from .common import EXIT_OK, add_model, model_name, prompts, step


def add(sub: Any) -> None:
    blade = sub.add_parser("blade", help="make a blade from a source model, or show what a blade file records")
    actions = blade.add_subparsers(dest="blade_command", required=True, metavar="ACTION")
    extract = actions.add_parser("extract", help="record a source model's hidden state on domain prompts")
    add_model(extract)
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
    info = actions.add_parser("info", help="show a blade file's metadata, shape and norm")
    info.add_argument("file", type=Path, help="a blade .safetensors file")
    blade.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.blade_command == "info":
        for key, value in blades.info(args.file).items():
            print(f"{key:15} {value}")
        return EXIT_OK
    texts = prompts([], args.prompts)
    if not texts:
        raise ValueError(f"{args.prompts} holds no prompts: write one a line")
    name = model_name(args)
    with step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name)
    with step(f"reading {args.site} on {len(texts)} prompts"):
        calibration = prompts([], args.calibration) if args.calibration else None
        blade = blades.extract(model, tokenizer, texts, site=args.site, reduce=args.reduce, domain=args.domain,
                               source=name, project=args.project, width=args.width, calibration=calibration)
    path = blade.save(args.output)
    shape = ", ".join(str(n) for n in blade.tensor.shape)
    print(f"{path}: [{shape}] at {blade.metadata['site']} of {name}, norm {blade.tensor.norm():.4g}")
    return EXIT_OK
