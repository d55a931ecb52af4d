"""The GPU path, measured in one run: scoring, hooks, CUDA-graph decoding, memory and exactness, for three
model shapes with random weights, against baselines measured in the same run. Prints one markdown table
for bench/RESULTS.md.

    python bench/gpu.py                        # on a GPU: bf16, the real shapes; about 8 minutes on an H200
    python bench/gpu.py --device cpu --quick   # CI's smoke test: tiny shapes, float32, aot_eager, under a minute

Shapes: GPT-2 124M, a Llama-3.2-1B shape and a Mixtral shape (12 layers, 8 experts, top 2). The spec is
`at h.6 scale 0.9; at h.8[last] add v * 2` (with --quick, the same at h.0 and h.1 of 2-layer models).
- P1, scoring: torch.compile of the injected model ÷ torch.compile(model), at 1×128 and 8×512 (goal ≤ 1.0×),
  with the plain compile's graph breaks.
- P2: eager model + a forward hook doing the same (the seed library's way) ÷ compiled injected: how many
  times faster (goal ≥ 2.5× at batch 1).
- P3, decoding: tokens/s of compiled `inj.generate` (compile="reduce-overhead": CUDA graphs per token) ÷
  transformers' static cache compiled with mode="reduce-overhead" (its documented recipe), batch 1 and 8,
  128 new tokens after a 32-token prompt (goal ≥ 1.0×).
- Memory: peak allocated memory of the injected run ÷ the plain run's (CUDA only).
- Exactness: bf16 logits of the compiled injected model against eager + hook (max |Δ| ÷ max |logit|), and how
  many greedy tokens of compiled `inj.generate` equal `model.generate` with the hook before the first
  difference (random weights make near-ties, so bf16 rounding may part them late).
Timing: CUDA events on a GPU (the wall clock on a CPU), the median of --repeat runs after warm-up runs that
absorb compilation. Sections run in that order for all shapes, P3 last, and a section that would start after
--budget seconds is skipped and said so, so that a cut-short run still prints its table.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

import garage

SPEC = "at h.{a} scale 0.9; at h.{b}[last] add v * 2"
NEW_TOKENS, PROMPT = 128, 32


# ------------------------------------------------------------------ shapes
def shapes(quick: bool) -> dict[str, Callable[[], torch.nn.Module]]:
    """Each shape's constructor (random weights): the real sizes, or 2-layer stand-ins for the smoke test."""
    if quick:
        small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, vocab_size=512)
        return {
            "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512)),
            "llama": lambda: LlamaForCausalLM(LlamaConfig(**small)),
            "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2)),
        }
    return {
        "gpt2-124m": lambda: GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)),
        "llama-1b": lambda: LlamaForCausalLM(LlamaConfig(  # Llama 3.2 1B's shape
            num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)),
        "mixtral": lambda: MixtralForCausalLM(MixtralConfig(
            num_hidden_layers=12, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
            num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)),
    }


def layers_for(model: torch.nn.Module) -> tuple[int, int]:
    """The blocks the spec scales (a) and steers (b)."""
    return (6, 8) if model.config.num_hidden_layers > 8 else (0, 1)


def spec_for(model: torch.nn.Module) -> str:
    a, b = layers_for(model)
    return SPEC.format(a=a, b=b)


# ------------------------------------------------------------------ timing
@dataclass
class Clock:
    """Median seconds of a call, by CUDA events on a GPU and by the wall clock elsewhere."""

    device: str
    repeat: int
    warmup: int

    def __call__(self, fn: Callable[[], object], repeat: int | None = None) -> float:
        for _ in range(self.warmup):
            fn()
        times = [self._once(fn) for _ in range(repeat or self.repeat)]
        return statistics.median(times)

    def _once(self, fn: Callable[[], object]) -> float:
        if self.device != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1e3


def peak_memory(device: str, fn: Callable[[], object]) -> float | None:
    """Peak bytes allocated while `fn` runs, above what was allocated before (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


@contextlib.contextmanager
def hooked(model: torch.nn.Module, v: torch.Tensor) -> Iterator[None]:
    """The seed library's way, written here with its own module paths and formula: forward hooks that scale
    block a's output by 0.9 and add 2v at block b's last real token."""
    a, b = layers_for(model)
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    state: dict[str, torch.Tensor] = {}

    def remember_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if mask is None and ids is not None:
            mask = torch.ones_like(ids)
        if mask is not None:
            state["mask"] = mask

    def scale(module: torch.nn.Module, args: tuple, out: Any) -> Any:
        return (out[0] * 0.9, *out[1:]) if isinstance(out, tuple) else out * 0.9

    def add_last(module: torch.nn.Module, args: tuple, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        mask = state["mask"][:, -h.shape[1]:]  # the mask grows during generate; h is the new tokens
        last = (mask.long().cumsum(-1) == mask.long().sum(-1, keepdim=True)) & mask.bool()
        if h.shape[1] == 1 and state["mask"].shape[1] > 1:
            last = torch.ones_like(last)  # a decode step: its one token is the last real token
        h = h + 2 * v * last[..., None].to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handles = [model.register_forward_pre_hook(remember_mask, with_kwargs=True),
               blocks[a].register_forward_hook(scale), blocks[b].register_forward_hook(add_last)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------ the run
@dataclass
class Report:
    rows: list[tuple[str, ...]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, model: str, measure: str, shape: str, garage_value: str, baseline: str, ratio: float | None,
            goal: str = "", met: bool | None = None) -> None:
        ratio_text = "n/a" if ratio is None else f"{ratio:.2f}×"
        verdict = "" if met is None else ("yes" if met else "**no**")
        self.rows.append((model, measure, shape, garage_value, baseline, ratio_text, goal, verdict))
        print("  " + " | ".join(self.rows[-1]), flush=True)

    def table(self) -> str:
        head = ("model", "measure", "shape", "garage", "baseline", "ratio", "goal", "met")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [f"\nSkipped (over --budget): {', '.join(self.skipped)}"] if self.skipped else []
        return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def graph_breaks(fn: Callable[[], object]) -> int:
    """Graph breaks dynamo took while compiling what `fn` runs."""
    from torch._dynamo.utils import counters

    counters["graph_break"].clear()
    fn()
    return sum(counters["graph_break"].values())


def cuda_graph_skips() -> int:
    """How many times Inductor has declined to record a CUDA graph (each with a logged reason)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def scoring(name: str, model: torch.nn.Module, v: torch.Tensor, args: argparse.Namespace, clock: Clock,
            report: Report) -> None:
    """P1, P2, scoring memory and the logits' exactness, at each scoring shape."""
    spec = spec_for(model)
    vocab = model.config.vocab_size
    model.config.use_cache = False
    compiled_model = torch.compile(model, backend=args.backend)
    injected = garage.compile(model, spec, bind={"v": v}, compile={"backend": args.backend})
    for batch, seq in args.scoring:
        shape = f"{batch}×{seq}"
        ids = torch.randint(0, vocab, (batch, seq), device=args.device)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            breaks = graph_breaks(lambda: compiled_model(input_ids=ids, attention_mask=mask))
            plain = clock(lambda: compiled_model(input_ids=ids, attention_mask=mask))
            ours = clock(lambda: injected(input_ids=ids, attention_mask=mask))
            with hooked(model, v):
                eager_hook = clock(lambda: model(input_ids=ids, attention_mask=mask))
                reference = model(input_ids=ids, attention_mask=mask).logits.float()
            got = injected(input_ids=ids, attention_mask=mask).logits.float()
            memory = (peak_memory(args.device, lambda: injected(input_ids=ids, attention_mask=mask)),
                      peak_memory(args.device, lambda: compiled_model(input_ids=ids, attention_mask=mask)))
        report.add(name, "P1 scoring: compile(injected) ÷ compile(model)", shape, ms(ours),
                   f"{ms(plain)} ({breaks} graph breaks)", ours / plain, "≤ 1.0×", ours / plain <= 1.0)
        report.add(name, "P2: eager + hook ÷ compile(injected)", shape, ms(ours), ms(eager_hook), eager_hook / ours,
                   "≥ 2.5× at batch 1" if batch == 1 else "", eager_hook / ours >= 2.5 if batch == 1 else None)
        if memory[0] is not None and memory[1]:
            report.add(name, "peak memory, scoring", shape, f"{memory[0] / 2**20:.0f} MiB", f"{memory[1] / 2**20:.0f} MiB",
                       memory[0] / memory[1])
        error = ((got - reference).abs().max() / reference.abs().max()).item()
        report.add(name, "logits: max |Δ| ÷ max |logit| vs eager + hook", shape, f"{error:.1e}", "", None,
                   f"≤ {args.tolerance:g}", error <= args.tolerance)
    model.config.use_cache = True
    torch._dynamo.reset()


def decoding(name: str, model: torch.nn.Module, v: torch.Tensor, args: argparse.Namespace, clock: Clock,
             report: Report) -> None:
    """P3, decoding memory and greedy tokens, at each decode batch size."""
    spec = spec_for(model)
    vocab = model.config.vocab_size
    new = args.new_tokens
    model.generation_config.eos_token_id = None  # every run makes exactly `new` tokens
    model.generation_config.pad_token_id = 0
    injected = garage.compile(model, spec, bind={"v": v}, compile={"mode": "reduce-overhead", "backend": args.backend})
    config = transformers.CompileConfig(backend=args.backend)  # its defaults: mode "reduce-overhead", decode steps only
    config._compile_all_devices = True  # a CPU run compiles too (transformers compiles on accelerators only)
    hf = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
              compile_config=config)
    for batch in args.decode:
        ids = torch.randint(0, vocab, (batch, PROMPT), device=args.device)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            before = cuda_graph_skips()
            theirs = clock(lambda: model.generate(ids, attention_mask=mask, **hf), repeat=args.decode_repeat)
            middle = cuda_graph_skips()
            ours = clock(lambda: injected.generate(ids, attention_mask=mask, max_new_tokens=new), repeat=args.decode_repeat)
            skipped = (cuda_graph_skips() - middle, middle - before)
            memory = (peak_memory(args.device, lambda: injected.generate(ids, attention_mask=mask, max_new_tokens=new)),
                      peak_memory(args.device, lambda: model.generate(ids, attention_mask=mask, **hf)))
            tokens = injected.generate(ids, attention_mask=mask, max_new_tokens=new)[:, PROMPT:]
            with hooked(model, v):
                reference = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                           do_sample=False)[:, PROMPT:]
        rate_ours, rate_theirs = batch * new / ours, batch * new / theirs
        said = [f" ({n} CUDA-graph skips)" if args.device == "cuda" else "" for n in skipped]
        report.add(name, "P3 decoding tokens/s: inj.generate ÷ HF static cache, both reduce-overhead", f"batch {batch}",
                   f"{rate_ours:.1f}{said[0]}", f"{rate_theirs:.1f}{said[1]}", rate_ours / rate_theirs, "≥ 1.0×",
                   rate_ours >= rate_theirs)
        if memory[0] is not None and memory[1]:
            report.add(name, "peak memory, decoding", f"batch {batch}", f"{memory[0] / 2**20:.0f} MiB",
                       f"{memory[1] / 2**20:.0f} MiB", memory[0] / memory[1])
        same = (tokens == reference).long().cumprod(-1).sum(-1)  # each row's tokens before its first difference
        report.add(name, "greedy tokens equal to generate + hook, before the first difference", f"batch {batch}",
                   f"{int(same.min())}–{int(same.max())} of {new}", "", None)
    torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, small inputs, one timed run (the CI smoke test)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no new section starts")
    parser.add_argument("--only", nargs="*", help="shape names to run (default: all)")
    parser.add_argument("--repeat", type=int, help="timed runs per measurement (default: 20 on a GPU, 1 with --quick)")
    parser.add_argument("--backend", help="torch.compile's backend for every variant (default: inductor; with "
                        "--quick, aot_eager, which traces the same graphs without Inductor's minutes of C++ builds)")
    args = parser.parse_args()
    args.backend = args.backend or ("aot_eager" if args.quick else "inductor")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    args.scoring = [(1, 16)] if args.quick else [(1, 128), (8, 512)]
    args.decode = [2] if args.quick else [1, 8]
    args.new_tokens = 4 if args.quick else NEW_TOKENS
    args.tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    args.decode_repeat = 1 if args.quick else min(args.repeat or 3, 3)  # a generation is many steps
    clock = Clock(args.device, repeat=args.repeat or (1 if args.quick else 20), warmup=1 if args.quick or args.repeat else 3)
    started = time.perf_counter()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"# {gpu}, {torch.get_num_threads()} CPU threads, {dtype}, backend {args.backend}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, Python {platform.python_version()}", flush=True)
    report = Report()
    made = {name: make for name, make in shapes(args.quick).items() if not args.only or name in args.only}
    models: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    for section, run in (("scoring", scoring), ("decoding", decoding)):
        for name, make in made.items():
            if time.perf_counter() - started > args.budget:
                report.skipped.append(f"{section} of {name}")
                continue
            if name not in models:
                torch.manual_seed(0)
                with torch.device(args.device):  # built where it runs: a 1B model's random init is slow on a CPU
                    model = make().eval().to(dtype=dtype)
                models[name] = model, torch.randn(model.config.hidden_size, device=args.device, dtype=dtype)
            print(f"{section} {name} (at {time.perf_counter() - started:.0f} s)", flush=True)
            run(name, *models[name], args, clock, report)
    print(f"\n## bench/gpu.py: {gpu}, {dtype}, backend {args.backend}, torch {torch.__version__}, transformers "
          f"{transformers.__version__} ({time.perf_counter() - started:.0f} s)\n")
    print(report.table())


if __name__ == "__main__":
    main()
