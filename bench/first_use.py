"""Time to the first generated token, in a fresh process: garage's extra time over plain `model.generate`.

    python bench/first_use.py [MODEL ...]      # default: smollm2 (when installed) and tiny:gpt2

Each measurement runs in a new Python process, which loads the model, times a plain `model.generate` of
20 tokens (its first call), then `garage.compile` of a 2-statement spec and the first `inj.generate` of the
same 20 tokens. garage's extra time is (compile + first generate) − plain generate. Two cases:

- cold: an empty graph cache (the dequantized model is shared, so loading is not what is timed);
- warm: a second fresh process, after the cold one filled the cache for this model, spec and versions;
- new user, first run (smollm2 only): a cache with nothing in it at all, so the model is dequantized from
  the GGUF wheel in that process;
- new user, second process: what every user's second run costs. It loads the model from garage's copy,
  not the GGUF, and must still find the graphs the first run exported.

Targets on the 2-core CI machine, for smollm2: cold ≤ 10 s extra, warm (and the second process) ≤ 2 s extra.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from garage import _cache

SPEC = "at h.6 scale 0.9\nat h.N-4 add v * 2"
CHILD = r"""
import json, sys, time, torch
from garage.models import load_model_and_tokenizer
import garage
name = sys.argv[1]
start = time.perf_counter()
model, tokenizer = load_model_and_tokenizer(name)
loaded = time.perf_counter() - start
inputs = tokenizer(["I think my neighbour is"], return_tensors="pt")
generation = dict(max_new_tokens=20, do_sample=False, eos_token_id=None)
start = time.perf_counter()
with torch.no_grad():
    plain = model.generate(**inputs, **generation, pad_token_id=tokenizer.pad_token_id)
plain_s = time.perf_counter() - start
vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
injected = garage.compile(model, sys.argv[2], bind={"v": vector / vector.norm()})
compile_s = time.perf_counter() - start
start = time.perf_counter()
tokens = injected.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=20,
                           eos_token_id=[])
generate_s = time.perf_counter() - start
assert tokens.shape == plain.shape, (tokens.shape, plain.shape)
print(json.dumps({"load": loaded, "plain": plain_s, "compile": compile_s, "generate": generate_s}))
"""


def measure(model: str, cache: Path) -> dict[str, float]:
    env = {**os.environ, "GARAGE_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", CHILD, model, SPEC], capture_output=True, text=True, env=env,
                            check=False)
    if result.returncode != 0:
        raise SystemExit(f"{model}: the measuring process failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def fresh_cache(shared_models: Path | None) -> Path:
    """An empty cache folder, sharing the user's dequantized models (loading is not what is measured), and
    the key that sealed them, so they check out."""
    folder = Path(tempfile.mkdtemp(prefix="garage-first-use-"))
    if shared_models is not None and shared_models.is_dir():
        (folder / "models").symlink_to(shared_models, target_is_directory=True)
        shutil.copy2(shared_models.parent / _cache.KEY, folder / _cache.KEY)
    return folder


def main(models: list[str]) -> None:
    from garage.models import SMOLLM2, load_model_and_tokenizer, smollm2_available

    root = _cache.root()
    shared = root / "models" if root is not None else None
    if not models:
        models = ([SMOLLM2] if smollm2_available() else []) + ["tiny:gpt2"]
    if SMOLLM2 in models:
        load_model_and_tokenizer(SMOLLM2)  # dequantize once, outside the timings
    print(f"spec: {SPEC!r}; 20 new tokens, greedy; each row a fresh process")
    print("| model | case | load | plain generate | garage.compile | first inj.generate | garage extra | target |")
    print("|---|---|---|---|---|---|---|---|")
    for model in models:
        cases = [(fresh_cache(shared), (("cold", 10.0), ("warm", 2.0)))]
        if model == SMOLLM2:
            cases.append((fresh_cache(None), (("new user, first run", 10.0), ("new user, second process", 2.0))))
        for cache, rows in cases:
            for case, target in rows:
                t = measure(model, cache)
                extra = t["compile"] + t["generate"] - t["plain"]
                print(f"| {model} | {case} | {t['load']:.1f} s | {t['plain']:.2f} s | {t['compile']:.2f} s | "
                      f"{t['generate']:.2f} s | **{extra:.1f} s** | ≤ {target:g} s |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
