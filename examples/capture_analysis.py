"""Activation capture and effect analysis: per-layer statistics, and what a spec changes layer by layer.

    python examples/capture_analysis.py
"""

from pathlib import Path

import garage
from garage import analyze
from garage.core.loader import quick_load

HERE = Path(__file__).parent
model, tokenizer, info = quick_load("tiny:gpt2")
inputs = dict(tokenizer(["The meaning of life is", "Hello"], return_tensors="pt", padding=True))

states = analyze.capture(model, ["h.0", "h.6", "h.-1", "final"], inputs)
for site, h in states.items():
    stats = analyze.layer_stats(h, inputs["attention_mask"])
    print(f"{site:6} " + "  ".join(f"{k}={v:+.3f}" for k, v in stats.items()))

spec = garage.load(HERE / "analysis.garage")
injected = garage.compile(model, spec)
injected(**inputs)
print("captured:", sorted(injected.captures)[:3], "...")
print(analyze.effect_table(analyze.compare(model, spec, inputs)))
