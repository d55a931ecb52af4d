"""`garage run SPEC`: generate text with the spec compiled into the model, and without it (--compare)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..analyze import compare, effect_table, generations, routing, routing_table
from ..models import chat_prompt, load_model_and_tokenizer
from .common import EXIT_OK, add_spec, compiled, count, model_name, print_warnings, step


def add(sub: Any) -> None:
    p = sub.add_parser("run", help="generate text with the spec compiled into the model")
    add_spec(p)
    p.add_argument("--prompt", default="I think my neighbour is", help="text to continue (default: %(default)r)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template; print the reply")
    p.add_argument("--max-new-tokens", type=count, default=20, metavar="N", help="tokens to generate (default: 20)")
    p.add_argument("--compare", action="store_true",
                   help="also generate without the spec, and show how far the spec moves each layer")
    p.add_argument("--routing", action="store_true",
                   help="also show how each MoE router sends the prompt's tokens to experts, with and without the spec")
    p.add_argument("--sample", action="store_true",
                   help="sample (with the model's generation config, as model.generate does) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="seed for built-in models and sampling (default: 0)")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the injected graphs (slow to start); MODE reduce-overhead also replays CUDA "
                        "graphs for each decoded token on a GPU")
    p.add_argument("--params", type=Path, metavar="FILE", help="learned parameters for the spec (garage train)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    name = model_name(args)
    with step(f"loading {name}"):
        model, tokenizer = load_model_and_tokenizer(name, seed=args.seed)
    prompt = chat_prompt(tokenizer, args.prompt, name) if args.chat else args.prompt
    with step("checking and compiling the spec"):
        injected = compiled(model, args.spec, compile=args.compile, params=args.params)
    print_warnings(injected)
    # A chat template already holds the special tokens a model wants; plain text gets the tokenizer's own.
    inputs = dict(tokenizer([prompt], return_tensors="pt", add_special_tokens=not args.chat))
    shown_from = inputs["input_ids"].shape[1] if args.chat else 0  # a chat shows the reply alone

    def text(tokens: torch.Tensor) -> str:
        return str(tokenizer.decode(tokens[0, shown_from:], skip_special_tokens=True)).strip("\n")

    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    with step("generating"):
        if args.compare:
            steered, plain = generations(injected, inputs, seed=args.seed, **options)
        else:
            torch.manual_seed(args.seed)
            steered = injected.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], **options)
    print(f"== with {args.spec}")
    print(text(steered))
    if args.compare:
        print("== without")
        print(text(plain))
        print("== how far the spec moves each layer (on the prompt)")
        print(effect_table(compare(model, injected.plan.spec, inputs)))
    if args.routing:
        print("== how each router sends the prompt's tokens to experts (without → with the spec; * chosen)")
        print(routing_table(routing(model, injected.plan.spec, inputs)))
    return EXIT_OK
