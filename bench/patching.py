"""Activation patching on smollm2: a sweep's cells per second against the naive loop, and attribution
patching's agreement with the exact sweep, measured in one run on this machine.

    python bench/patching.py [--model smollm2] [--batch 32] [--figure docs/img/causal-tracing-smollm2.png]

The experiment is causal tracing: the clean prompt names the Eiffel Tower (answer " Paris"), the corrupt one
the Colosseum (" Rome"), with as many tokens. Every cell (a block's output at one token) is patched from the
clean run into the corrupt one, and the metric is the logit difference " Paris" − " Rome".
- naive loop: one forward per cell, with a forward hook that puts in the clean value, as TransformerLens
  users write it (the clean values cached by one hooked forward first);
- garage, one cell a forward (`batch_size=1`): the same loop through the injected graph;
- garage sweep: `garage.analyze.patching`, many cells a forward (one a batch row, the source run once);
- attribution: one forward and one backward, for every cell; compared with the exact sweep (Pearson r).
Each timing is the best of --repeats runs (default 1), after a warm-up sweep.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any, Callable

import torch
import transformers

from garage.analyze import patching
from garage.models import load_model_and_tokenizer
from garage.pictures import heatmap

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"
ANSWER, WRONG = " Paris", " Rome"


def best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def naive(model: Any, blocks: Any, clean: dict, corrupt: dict, answer: int, wrong: int) -> torch.Tensor:
    """One hooked forward per cell, the clean block outputs cached first."""
    cache: dict[int, torch.Tensor] = {}
    handles = [block.register_forward_hook(lambda _m, _a, out, i=i: cache.__setitem__(i, out[0] if isinstance(out, tuple) else out))
               for i, block in enumerate(blocks)]
    with torch.no_grad():
        model(**clean)
    for handle in handles:
        handle.remove()
    length = corrupt["input_ids"].shape[1]
    table = torch.zeros(len(blocks), length)
    for layer, block in enumerate(blocks):
        for token in range(length):
            def put(_m: Any, _a: Any, out: Any, layer: int = layer, token: int = token) -> Any:
                h = (out[0] if isinstance(out, tuple) else out).clone()
                h[:, token] = cache[layer][:, token]
                return (h, *out[1:]) if isinstance(out, tuple) else h
            handle = block.register_forward_hook(put)
            with torch.no_grad():
                logits = model(**corrupt).logits
            handle.remove()
            table[layer, token] = logits[0, -1, answer] - logits[0, -1, wrong]
    return table


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=32, help="cells per forward of the sweep")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--figure", help="also write the sweep's heatmap here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    clean, corrupt = (dict(tokenizer([t], return_tensors="pt")) for t in (CLEAN, CORRUPT))
    answer, wrong = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (ANSWER, WRONG))
    blocks = model.model.layers
    cells = len(blocks) * clean["input_ids"].shape[1]
    print(f"{args.model}: {len(blocks)} blocks × {clean['input_ids'].shape[1]} tokens = {cells} cells; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    sweep_args = dict(sites="h.*", answer=ANSWER, wrong=WRONG, tokenizer=tokenizer)
    patching(model, CLEAN, CORRUPT, **sweep_args)  # warm-up: the trace, and the first calls
    t_naive, naive_table = best(lambda: naive(model, blocks, clean, corrupt, answer, wrong), args.repeats)
    t_one, _ = best(lambda: patching(model, CLEAN, CORRUPT, batch_size=1, **sweep_args), args.repeats)
    t_sweep, exact = best(lambda: patching(model, CLEAN, CORRUPT, batch_size=args.batch, **sweep_args), args.repeats)
    t_attr, attribution = best(lambda: patching(model, CLEAN, CORRUPT, method="attribution", **sweep_args), args.repeats)
    print(f"\nsweep vs naive loop: max |difference| of the raw metric {float((exact.values - naive_table).abs().max()):.2e}")
    print("\n| method | seconds | cells/s | × naive loop |")
    print("|---|---|---|---|")
    for label, seconds in (("naive loop (hooks, a forward a cell)", t_naive), ("garage, a forward a cell", t_one),
                           (f"garage sweep ({args.batch} cells a forward)", t_sweep),
                           ("attribution (1 forward + 1 backward)", t_attr)):
        print(f"| {label} | {seconds:.2f} | {cells / seconds:.0f} | {t_naive / seconds:.1f}× |")
    print("\n| sites | exact vs attribution, Pearson r |")
    print("|---|---|")
    print(f"| h.* (block outputs) | {pearson(exact.table, attribution.table):.3f} |")
    for sites in ("h.*.attn", "h.*.mlp"):
        a = patching(model, CLEAN, CORRUPT, **{**sweep_args, "sites": sites}, batch_size=args.batch)
        b = patching(model, CLEAN, CORRUPT, **{**sweep_args, "sites": sites}, method="attribution")
        print(f"| {sites} | {pearson(a.table, b.table):.3f} |")
    print(f"\nclean {exact.clean:.3f}, corrupt {exact.corrupt:.3f}\n{exact}")
    if args.figure:
        heatmap(exact, args.figure, f"causal tracing, {args.model}: {CLEAN!r} → {ANSWER!r} vs {WRONG!r}")
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
