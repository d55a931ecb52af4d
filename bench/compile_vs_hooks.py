"""Injected graphs against hooks and torch.compile, measured in one run on this machine.

    python bench/compile_vs_hooks.py [--quick] [--device cpu|cuda]

Prints, per model and batch size, the time of one forward pass for: eager, eager + hook,
torch.compile(model), torch.compile(model + hook), the injected graph, and torch.compile(injected graph),
with ratios against torch.compile(model). Then the time to re-compile a 100-statement spec on an
already traced 32-layer model. Models have random weights (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import garage
import garage.runtime.hooks

SPEC = "at h.6 scale 0.9; at h.8[last] add steer * 2"


def gpt2_124m() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)).eval()


def llama_shaped() -> torch.nn.Module:
    config = LlamaConfig(num_hidden_layers=12, hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                         num_key_value_heads=4, vocab_size=32000)
    return LlamaForCausalLM(config).eval()


def timed(fn: Callable[[], object], device: str, repeat: int, warmup: int = 3) -> float:
    """Median seconds of one call, after warm-up (which absorbs compilation)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, model: torch.nn.Module, batch: int, seq: int, device: str, repeat: int) -> list[tuple]:
    hidden = model.config.hidden_size
    bind = {"steer": torch.randn(hidden, device=device)}
    ids = torch.randint(0, 1000, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    model.config.use_cache = False
    injected = garage.compile(model, SPEC, bind=bind)
    compiled_injected = garage.compile(model, SPEC, bind=bind, compile=True)

    def eager():
        return model(**inputs)

    def compiled_with_hooks():
        # Hooks must exist before torch.compile: dynamo silently ignores hooks added afterwards.
        hooks = garage.runtime.hooks.attach(model, [s.site for s in injected.plan], list(injected.ops))
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        return lambda: compiled(**inputs), hooks

    times = {}
    with torch.no_grad():
        times["eager"] = timed(eager, device, repeat)
        with garage.runtime.hooks.attach(model, [s.site for s in injected.plan], list(injected.ops)):
            times["eager + hook"] = timed(eager, device, repeat)
        torch._dynamo.reset()
        compiled_model = torch.compile(model, fullgraph=True)
        times["compile(model)"] = timed(lambda: compiled_model(**inputs), device, repeat)
        run, hooks = compiled_with_hooks()
        with hooks:
            times["compile(model + hook)"] = timed(run, device, repeat)
        times["injected graph"] = timed(lambda: injected(**inputs), device, repeat)
        torch._dynamo.reset()
        times["compile(injected)"] = timed(lambda: compiled_injected(**inputs), device, repeat)
    rows = []
    base = times["compile(model)"]
    for variant, t in times.items():
        rows.append((name, batch, variant, t * 1e3, t / base))
    torch._dynamo.reset()
    return rows


def recompile_time() -> tuple[float, float]:
    """Median seconds of garage.compile of a 100-statement spec on a traced 32-layer model, and of compile + first call.

    The injected GraphModule generates its Python code lazily, on its first call: the second number includes that.
    """
    config = LlamaConfig(num_hidden_layers=32, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config).eval()
    garage.compile(model, "at h.0 scale 1")  # traces once (an empty spec has nothing to check)
    statements = [f"at h.{i % 32}{['', '.mlp', '.attn', '.in'][i % 4]} scale {1 + i / 1000}" for i in range(100)]
    spec = garage.parse("\n".join(statements))
    ids = torch.randint(0, 128, (1, 8))
    compile_only, with_first_call = [], []
    for _ in range(5):
        start = time.perf_counter()
        injected = garage.compile(model, spec)
        compile_only.append(time.perf_counter() - start)
        with torch.no_grad():
            injected(input_ids=ids)
        with_first_call.append(time.perf_counter() - start)
    return statistics.median(compile_only), statistics.median(with_first_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 1 only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    repeat = 5 if args.quick else 10
    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {args.device}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, seq {args.seq}")
    print(f"# spec: {SPEC}")
    print(f"{'model':10} {'batch':>5}  {'variant':24} {'ms':>9}  {'× compile(model)':>16}")
    for name, make in (("gpt2-124m", gpt2_124m), ("llama", llama_shaped)):
        model = make().to(args.device)
        for batch in ((1,) if args.quick else (1, 8)):
            for row in bench_model(name, model, batch, args.seq, args.device, repeat):
                print(f"{row[0]:10} {row[1]:>5}  {row[2]:24} {row[3]:9.2f}  {row[4]:16.2f}")
    compile_only, first_call = recompile_time()
    print(f"\nre-compile of a 100-statement spec on a traced 32-layer model: {compile_only * 1e3:.1f} ms "
          f"(target 50 ms); with the first forward call (code generation + run): {first_call * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
