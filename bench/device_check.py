"""Heads and routers on an accelerator: the injected graph, the hook backend and torch.compile agree, in
float32 and bfloat16, and what a router spec costs against the plain compiled model. (In bfloat16 the
cached decode path rounds differently from model.generate's, and random weights give near-ties, so its
greedy tokens may part ways; float32 must agree.)

    python bench/device_check.py [--device cuda]

Models have random weights (nothing is downloaded). Prints one line per check, then a timing table.
"""

from __future__ import annotations

import argparse
import platform

import torch
import transformers
from compile_vs_hooks import timed
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

import garage

SPECS = {
    "llama": "at h.1.attn.heads{0, 2}[last] zero; at h.2.attn.heads add w; at h.3.attn.heads{1} scale 2",
    "mixtral": "at h.1.router bias {1, 5} * 6; at h.2.router mask {0}; at h.3.router force 2; at h.1.attn.heads{3} zero",
}


def tiny(name: str, hidden: int, layers: int) -> torch.nn.Module:
    common = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return MixtralForCausalLM(MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2)).eval()


def check(name: str, device: str, dtype: torch.dtype) -> None:
    model = tiny(name, 256, 4).to(device=device, dtype=dtype)
    bind = {"w": torch.randn(256 // 8, device=device, dtype=dtype)}
    ids = torch.randint(0, 32000, (3, 24), device=device)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    inj = garage.compile(model, SPECS[name], bind=bind)
    fast = garage.compile(model, SPECS[name], bind=bind, compile=True)
    hooks, _ = garage.hook(model, SPECS[name], bind=bind)
    with torch.no_grad():
        graph = inj(input_ids=ids, attention_mask=mask).logits.float()
        compiled = fast(input_ids=ids, attention_mask=mask).logits.float()
        with hooks:
            hooked = model(input_ids=ids, attention_mask=mask).logits.float()
            tokens_hooked = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        plain = model(input_ids=ids, attention_mask=mask).logits.float()
    tokens = inj.generate(ids, attention_mask=mask, max_new_tokens=8)
    scale = hooked.abs().max().item()
    print(f"{name:8} {str(dtype)[6:]:9} graph-hook {(graph - hooked).abs().max().item() / scale:.1e}  "
          f"compiled-hook {(compiled - hooked).abs().max().item() / scale:.1e}  "
          f"spec moves {(hooked - plain).abs().max().item() / scale:.2f}  "
          f"generated tokens equal to generate+hooks: {(tokens == tokens_hooked).float().mean().item():.0%}", flush=True)


def speed(device: str) -> None:
    model = tiny("mixtral", 1024, 8).to(device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, 32000, (8, 128), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    spec = "at h.*.router bias {1, 5} * 6; at h.4.attn.heads{0..3} zero"
    base = torch.compile(model)
    injected, fast = garage.compile(model, spec), garage.compile(model, spec, compile=True)
    variants = {
        "eager": lambda: model(**inputs),
        "compile(model)": lambda: base(**inputs),
        "injected graph": lambda: injected(**inputs),
        "compile(injected)": lambda: fast(**inputs),
    }
    times = {}
    with torch.no_grad():
        for label, fn in variants.items():
            times[label] = timed(fn, device, repeat=20)
    print("\n| variant (Mixtral-shaped, 8 layers, hidden 1024, 8 experts, bf16, batch 8 × 128) | time | vs compile(model) |")
    print("|---|---|---|")
    for label, t in times.items():
        print(f"| {label} | {t * 1e3:.2f} ms | {t / times['compile(model)']:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = parser.parse_args().device
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    print(f"{name}; torch {torch.__version__}, transformers {transformers.__version__}")
    for model_name in SPECS:
        for dtype in (torch.float32, torch.bfloat16):
            check(model_name, device, dtype)
    speed(device)


if __name__ == "__main__":
    main()
