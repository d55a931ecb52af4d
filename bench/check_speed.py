"""How long `garage.check` takes on a 32-layer model for a 100-statement spec, after the first trace.

    python bench/check_speed.py

The model is built from a config (random weights, nothing downloaded). Target: under 1 s.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import garage

SITES = ["", ".mlp", ".attn", ".in"]


def spec_text(n: int = 100) -> str:
    lines = []
    for i in range(n):
        site = f"h.{i % 32}{SITES[i % 4]}"
        op = ["scale 0.9", "add steer * 0.5", "module adapter", "clamp -3 3", "capture c{i}"][i % 5].format(i=i)
        lines.append(f"at {site} {op}")
    return "\n".join(lines)


def main() -> None:
    config = LlamaConfig(num_hidden_layers=32, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1000)
    model = LlamaForCausalLM(config).eval()
    bind = {"steer": torch.randn(256), "adapter": torch.nn.Linear(256, 256)}
    spec = garage.parse(spec_text())
    start = time.perf_counter()
    first = garage.check(model, spec, bind=bind)
    traced = time.perf_counter() - start
    assert first.ok, str(first)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        garage.check(model, spec, bind=bind)
        runs.append(time.perf_counter() - start)
    print(f"garage.check, 32 layers, 100 statements: first call (with trace) {traced:.2f} s; "
          f"after the trace: median {statistics.median(runs) * 1e3:.0f} ms (target < 1000 ms)")


if __name__ == "__main__":
    main()
