"""The steering curve of examples/steer.garage on smollm2: what each strength buys and what it costs.

    python bench/steering.py [--model smollm2] [--coefficients -4..4:0.5] [--figure docs/img/steering-curve-smollm2.png]

The spec adds the love-minus-hate vector at h.10. For each coefficient (the `* F` of its one statement),
`garage.analyze.strength_sweep` measures the effect (mean log p(happy, love, great) − log p(sad, hate,
awful) as the next word after six neutral openings), the perplexity of a held-out paragraph, and the KL
from the plain model on four neutral prompts. The spec is compiled once; each coefficient only refills a
buffer. The baseline is the plain model in the same run (coefficient 0 must equal it exactly).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import transformers

from garage.analyze import strength_sweep
from garage.models import load_model_and_tokenizer
from garage.pictures import curves
from garage.steering import coefficient_range, kl_from, perplexity, word_gap

SPEC = Path(__file__).resolve().parent.parent / "examples" / "steer.garage"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--coefficients", default="-4..4:0.5")
    parser.add_argument("--figure", help="also write the curves here")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model)
    coefficients = coefficient_range(args.coefficients)
    print(f"{args.model}: {SPEC.name}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads")
    plain = (word_gap(tokenizer)(model), perplexity(tokenizer)(model), kl_from(model, tokenizer)(model))
    start = time.perf_counter()
    sweep = strength_sweep(model, SPEC, coefficients, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    print(f"plain model: effect {plain[0]:.4f}, perplexity {plain[1]:.3f}, KL {plain[2]:.5f}")
    print(f"{len(coefficients)} coefficients in {seconds:.1f} s (one compile, a buffer refilled per coefficient)\n")
    print("| coefficient | effect (nats) | Δ effect vs plain | perplexity | × plain | KL (nats) |")
    print("|---|---|---|---|---|---|")
    for c, e, p, k in zip(sweep.coefficients, sweep.effect, sweep.perplexity, sweep.kl):
        print(f"| {c:g} | {e:.3f} | {e - plain[0]:+.3f} | {p:.2f} | {p / plain[1]:.2f}× | {k:.4f} |")
    if args.figure:
        curves(sweep, args.figure, f"{args.model}: examples/steer.garage, {sweep.statement}")
        print(f"\nwrote {args.figure}")


if __name__ == "__main__":
    main()
