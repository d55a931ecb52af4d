"""The seed's rule "learned gating beats direct injection", measured on held-out text.

    python bench/gated_vs_identity.py [--steps N] [--seeds 3]

Target: SmolLM2-135M-Instruct (`smollm2`). Corpus: the docstrings of Python's standard library (they ship
with Python, so they are there offline): every public function's and class's docstring of 40 modules,
cut to 64 tokens. Modules are split, not texts, so held-out text comes from modules never trained on:
30 modules train, 10 are held out. The blade is the model's own mean state at N-4 over the training
texts (`garage.blades.extract`); no stronger model of the same tokenizer is available offline, so it is a
self-blade (blade rule 3 says it has no capability gap to bridge; the lint says so too).

Held-out loss (mean next-token cross-entropy) for: no injection; the blade added with `identity`; with an
untrained `gated` blade; the gated blade trained; and a trained vector (`add learn`). Each trained row
uses the same steps, learning rate and batch order per seed; every row is mean ± half the range over
the seeds (the untrained rows do not depend on the seed).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

import garage
from garage.models import load_model_and_tokenizer
from garage.training import evaluate, examples

TRAIN_MODULES = ["json", "os.path", "collections", "itertools", "functools", "re", "string", "textwrap", "shutil",
                 "pathlib", "datetime", "random", "statistics", "math", "heapq", "bisect", "csv", "argparse",
                 "logging", "subprocess", "tempfile", "glob", "fnmatch", "copy", "pprint", "enum", "dataclasses",
                 "typing", "contextlib", "operator"]
HELD_OUT_MODULES = ["urllib.parse", "base64", "hashlib", "zipfile", "tarfile", "calendar", "difflib", "decimal",
                    "fractions", "queue"]
SITE, ALPHA, LR, BATCH, LENGTH = "N-4", 0.2, 5e-3, 8, 64


def docstrings(modules: list[str]) -> list[str]:
    """Every public function's and class's docstring in the modules, whitespace folded."""
    texts = []
    for name in modules:
        module = importlib.import_module(name)
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            doc = inspect.getdoc(value)
            if doc and len(doc) > 80:
                texts.append(" ".join(doc.split()))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("smollm2")
    train_texts, held_texts = docstrings(TRAIN_MODULES), docstrings(HELD_OUT_MODULES)
    held = examples(held_texts, tokenizer, LENGTH)
    pad = tokenizer.pad_token_id or 0
    blade = Path(tempfile.mkdtemp()) / "docs.blade.safetensors"
    garage.blades.extract(model, tokenizer, train_texts[:64], site=SITE, domain="python docs", path=blade)
    specs = {
        "no injection": "",
        "blade identity (untrained)": f'at {SITE} blade identity from "{blade}" alpha {ALPHA}',
        "blade gated, untrained": f'at {SITE} blade gated from "{blade}" alpha {ALPHA}',
        "blade gated, trained": f'at {SITE} blade gated from "{blade}" alpha {ALPHA}',
        "vector, trained (add learn)": f"at {SITE} add learn",
    }
    results: dict[str, list[float]] = {}
    for label, spec in specs.items():
        trains = "trained" in label and "untrained" not in label
        for seed in range(args.seeds if trains else 1):
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                inj = garage.compile(model, spec) if spec else None
            if inj is not None and trains:
                garage.train(inj, train_texts, steps=args.steps, lr=LR, batch_size=BATCH, max_length=LENGTH,
                             tokenizer=tokenizer, seed=seed)
            runner = inj if inj is not None else garage.compile(model, "")
            results.setdefault(label, []).append(evaluate(runner, held, LENGTH, pad, BATCH))
    base = results["no injection"][0]
    print(f"# smollm2 on CPU ({platform.machine()}), torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{len(train_texts)} training and {len(held_texts)} held-out docstrings; {args.steps} steps, lr {LR}, "
          f"batch {BATCH}, {LENGTH} tokens, {args.seeds} seeds; {time.perf_counter() - start:.0f} s")
    print("| injection | held-out loss | vs no injection |")
    print("|---|---|---|")
    for label, losses in results.items():
        mean = statistics.mean(losses)
        spread = f" ± {(max(losses) - min(losses)) / 2:.4f}" if len(losses) > 1 else ""
        print(f"| {label} | {mean:.4f}{spread} | {mean - base:+.4f} |")


if __name__ == "__main__":
    main()
