"""A live blade source fused into one graph, against the two models run separately, measured in one run.

    python bench/live_blade.py [--quick] [--device cpu|cuda]

Target and source are both SmolLM2-135M-Instruct (`smollm2`, 30 blocks, hidden 576; the source with its
weights perturbed, so that it is another model of the same family), or random models of its shape when
smollm2 is not installed. The spec is `at N-4 blade gated from model src`. Per batch and length it prints the time of one
scoring pass for:
- the target alone (eager), the baseline;
- the two models run separately: the source up to block K and the target with a forward hook adding the
  blade (the seed's recipe, in eager);
- the fused injected graph, eager and under torch.compile; and torch.compile of the target alone.
Then greedy generation of 32 tokens, and the peak memory of each way, each in a fresh process (CPU: peak
RSS; CUDA: max allocated), which shows that the source's weights are shared, not copied.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch
import transformers
from compile_vs_hooks import timed
from transformers import LlamaConfig, LlamaForCausalLM

import garage
from garage.models import load_model, smollm2_available

SPEC = "at N-4 blade gated from model src alpha 0.2"


def smollm2_shaped() -> torch.nn.Module:
    """SmolLM2-135M's shape with random weights, where smollm2 itself is not installed (nothing downloads)."""
    config = LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def models(device: str) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    real = smollm2_available()
    name = "smollm2" if real else "smollm2-shaped (random weights)"
    target = (load_model("smollm2") if real else smollm2_shaped()).to(device)
    source = (load_model("smollm2") if real else smollm2_shaped()).to(device)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in source.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(device) * 0.02 * p.std().clamp(min=1e-3))
    return target, source, name


def separately(target: torch.nn.Module, source: torch.nn.Module, k: int, layer: int, alpha: float):
    """The two-model reference: the source's block K recorded by a hook, added to the target's block by another."""
    state: dict[str, torch.Tensor] = {}
    gate = torch.nn.Linear(target.config.hidden_size, target.config.hidden_size).to(next(target.parameters()).device)
    torch.nn.init.zeros_(gate.weight)
    torch.nn.init.constant_(gate.bias, -2.0)

    class Stop(Exception):
        pass

    def record(_m, _a, o):
        state["s"] = o[0] if isinstance(o, tuple) else o
        raise Stop  # the source's later blocks and head do not run

    def add(_m, _a, o):
        h = o[0] if isinstance(o, tuple) else o
        return h + alpha * torch.sigmoid(gate(h)) * state["s"]

    source.model.layers[k].register_forward_hook(record)
    target.model.layers[layer].register_forward_hook(add)

    def run(**inputs: torch.Tensor) -> torch.Tensor:
        try:
            source.model(**inputs)
        except Stop:
            pass
        return target(**inputs).logits

    return run


def peak_memory(way: str, device: str) -> tuple[float, float]:
    """(MiB held after loading both models, MiB more at the peak of one 4×128 forward), in a fresh process.
    CPU: resident memory, its peak reset through /proc/self/clear_refs after loading (and after compiling,
    for the fused graph); CUDA: allocated memory."""
    script = f"""
import gc, sys, torch
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
from live_blade import models, separately, SPEC
import garage
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
target, source, name = models({device!r})
ids = torch.randint(3, 1000, (4, 128), device={device!r}); mask = torch.ones_like(ids)
n = target.config.num_hidden_layers
run = {{"separately": lambda: separately(target, source, n - 4, n - 4, 0.2),
        "fused": lambda: garage.compile(target, SPEC, bind={{"src": source}}),
        "target": lambda: target}}[{way!r}]()
with torch.no_grad():
    gc.collect()
    if {device!r} == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated() / 2**20
    else:
        open("/proc/self/clear_refs", "w").write("5"); base = status("VmRSS:")
    run(input_ids=ids, attention_mask=mask)
    peak = torch.cuda.max_memory_allocated() / 2**20 if {device!r} == "cuda" else status("VmHWM:")
print(base, peak - base)
"""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, check=True)
    base, extra = out.stdout.strip().splitlines()[-1].split()
    return float(base), float(extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device, repeat = args.device, 3 if args.quick else 7
    target, source, name = models(device)
    n = target.config.num_hidden_layers
    print(f"# {name} ← {name} (perturbed), {SPEC!r}; {platform.processor() or platform.machine()}, {device}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, garage {garage.__version__}")
    fused = garage.compile(target, SPEC, bind={"src": source})
    compiled = garage.compile(target, SPEC, bind={"src": source}, compile=True)
    plain_compiled = torch.compile(target)
    reference = separately(target, source, n - 4, n - 4, 0.2)
    shapes = [(1, 64)] if args.quick else [(1, 64), (4, 128)]
    rows = [("batch×seq", "target eager", "two models, hooks", "fused eager", "fused compiled",
             "compile(target)", "fused compiled ÷ hooks")]
    with torch.no_grad():
        for batch, seq in shapes:
            ids = torch.randint(3, 1000, (batch, seq), device=device)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            want = reference(**inputs)
            got = fused(**inputs).logits
            assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
            t = [timed(lambda f=f: f(**inputs), device, repeat) for f in
                 (target, reference, fused, compiled, plain_compiled)]
            rows.append((f"{batch}×{seq}", *(f"{x * 1e3:.1f} ms" for x in t), f"{t[3] / t[1]:.2f}"))
        prompt = torch.randint(3, 1000, (1, 16), device=device)
        gen = [timed(lambda f=f: f.generate(prompt, max_new_tokens=32), device, 1, warmup=1) for f in (fused, compiled)]
    for row in rows:
        print(" | ".join(row))
    print(f"generate 32 tokens: fused eager {gen[0]:.2f} s, fused compiled {gen[1]:.2f} s")
    memory = {way: peak_memory(way, device) for way in ("target", "separately", "fused")}
    print("memory, fresh process each, both models loaded: " + ", ".join(
        f"{way}: {base:.0f} MiB held, +{extra:.0f} MiB at the peak of a 4×128 forward"
        for way, (base, extra) in memory.items()))
    print(json.dumps({"rows": rows, "generate_s": gen, "memory_mib": memory}))


if __name__ == "__main__":
    main()
