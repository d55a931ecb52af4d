"""Decoding speed: tokens per second for HF generate (eager, with hooks, compiled with a static cache) and
InjectedModel.generate (eager and compiled), measured in one run on this machine.

    python bench/generate.py [--quick] [--device cpu|cuda] [--new-tokens 32]

Models have random weights (nothing downloaded). Every generation makes exactly --new-tokens tokens
(eos is disabled), so tokens/s compare like with like. The first call of each variant is a warm-up and
absorbs compilation.
"""

from __future__ import annotations

import argparse
import platform
from typing import Callable

import torch
import transformers
from compile_vs_hooks import SPEC, gpt2_124m, llama_shaped, timed

import garage
import garage.runtime.hooks


def tokens_per_second(fn: Callable[[], torch.Tensor], new_tokens: int, batch: int, device: str, repeat: int) -> float:
    return batch * new_tokens / timed(fn, device, repeat, warmup=1)


def bench(name: str, model: torch.nn.Module, batch: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    device, new = args.device, args.new_tokens
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.randint(0, 1000, (batch, args.prompt), device=device)
    mask = torch.ones_like(ids)
    bind = {"steer": torch.randn(model.config.hidden_size, device=device)}
    injected = garage.compile(model, SPEC, bind=bind)
    compiled_injected = garage.compile(model, SPEC, bind=bind, compile=True)
    hf = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    rows: list[tuple[str, str]] = []

    def measure(variant: str, fn: Callable[[], torch.Tensor]) -> None:
        try:
            rate = tokens_per_second(fn, new, batch, device, args.repeat)
            rows.append((variant, f"{rate:9.1f}"))
        except Exception as err:  # a variant that does not work here is reported, not fatal
            rows.append((variant, f"n/a ({type(err).__name__}: {str(err).splitlines()[0][:60]})"))

    with torch.no_grad():
        measure("model.generate", lambda: model.generate(ids, attention_mask=mask, **hf))
        with garage.runtime.hooks.attach(model, [s.site for s in injected.plan], list(injected.ops)):
            measure("model.generate + hooks", lambda: model.generate(ids, attention_mask=mask, **hf))
        # HF's recipe for compiled decoding: a static cache and a compiled forward.
        eager_forward = model.forward
        model.forward = torch.compile(eager_forward, fullgraph=True)
        measure("compile(model) + HF generate, static cache", lambda: model.generate(
            ids, attention_mask=mask, cache_implementation="static", **hf))
        model.forward = eager_forward
        torch._dynamo.reset()
        measure("inj.generate", lambda: injected.generate(ids, attention_mask=mask, max_new_tokens=new))
        measure("inj.generate compiled", lambda: compiled_injected.generate(ids, attention_mask=mask, max_new_tokens=new))
    torch._dynamo.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    args = parser.parse_args()
    args.repeat = 2 if args.quick else 3
    torch.manual_seed(0)
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, device {args.device}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; prompt {args.prompt}, {args.new_tokens} new tokens")
    print(f"{'model':10} {'batch':>5}  {'variant':42} {'tokens/s':>9}")
    for name, make in (("gpt2-124m", gpt2_124m), ("llama", llama_shaped)):
        model = make().to(args.device)
        for batch in ((1,) if args.quick else (1, 8)):
            for variant, rate in bench(name, model, batch, args):
                print(f"{name:10} {batch:>5}  {variant:42} {rate:>9}", flush=True)


if __name__ == "__main__":
    main()
