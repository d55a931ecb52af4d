"""`garage sae top`: the SAE features each token of a prompt activates most."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..features import default_site, top_features
from ..models import load_model_and_tokenizer
from ..sae import load_sae
from .common import EXIT_OK, add_json, add_model, count, model_name, progress, step


def add(sub: Any) -> None:
    sae = sub.add_parser("sae", help="sparse autoencoder features (SAELens folders) of a prompt")
    actions = sae.add_subparsers(dest="sae_command", required=True, metavar="ACTION")
    top = actions.add_parser("top", help="the k most active SAE features of each token of a prompt")
    add_model(top)
    top.add_argument("--sae", required=True, type=Path, metavar="FOLDER",
                     help="an SAELens SAE folder (cfg.json and sae_weights.safetensors)")
    top.add_argument("--site", help="where to read it, e.g. h.6 (default: the site its cfg.json's hook_name names)")
    top.add_argument("--prompt", default="I think my neighbour is", help="text to run (default: %(default)r)")
    top.add_argument("-k", type=count, default=5, help="features listed per token (default: %(default)s)")
    add_json(top)
    sae.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with step(f"reading the SAE in {args.sae}"):
        sae = load_sae(args.sae)
    site = args.site or default_site(sae)
    name = model_name(args)
    with step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name)
    found = top_features(model, tokenizer, sae, args.prompt, site, args.k)
    if found.elsewhere:
        progress(f"warning: {found.elsewhere} [sae-site]")
    if args.json:
        print(json.dumps({"model": name, "prompt": args.prompt, **found.as_dict()}, indent=2))
        return EXIT_OK
    recorded = f", trained at {sae.hook_name}" if sae.hook_name else ""
    print(f"== {sae.d_sae} features of {args.sae}{recorded}, read at {found.site} of {name} on {args.prompt!r}")
    width = max((len(repr(t.token)) for t in found.tokens), default=0)
    for t in found.tokens:
        listed = "  ".join(f"{f}: {a:.4g}" for f, a in t.features) or "(none active)"
        print(f"{t.position:4}  {repr(t.token):{width}}  {listed}")
    return EXIT_OK
