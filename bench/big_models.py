"""Models loaded with an accelerate `device_map`: what `garage.compile` does with each, whether its numbers
equal a hand-written hook, and what it costs against the same model run eagerly, with and without hooks.

    python bench/big_models.py                   # on this machine's accelerator if it has one, else the CPU
    python bench/big_models.py --device cpu --quick

A random Llama-shaped model is saved once and loaded three ways:
- whole, on one device (`device_map={"": device}`): garage traces it (an fx graph, torch.compile applies);
- half its blocks offloaded to the CPU (on an accelerator; on the CPU, to disk): garage runs by hooks;
- half its blocks offloaded to disk: the same.
For each: logits against a forward hook written here (× 0.5 on block 2's output, + v on block 1's MLP),
greedy tokens against `model.generate` under that hook, and the scoring time of eager, eager + hooks, and
garage. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import garage

SPEC = "at h.2 scale 0.5; at h.1.mlp add v"


def save_model(folder: Path, hidden: int, layers: int) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128 or 1)
    LlamaForCausalLM(config).save_pretrained(folder)


def device_map(device: str, layers: int, offload: str | None) -> dict[str, Any]:
    """Everything on `device`, except the second half of the blocks on `offload` ("cpu" or "disk")."""
    where = {f"model.layers.{i}": (offload if offload and i >= layers // 2 else device) for i in range(layers)}
    return {"model.embed_tokens": device, **where, "model.norm": device, "model.rotary_emb": device, "lm_head": device}


def reference(model: torch.nn.Module, v: torch.Tensor) -> list:
    """This file's hooks: block 2's output × 0.5, block 1's MLP output + v."""
    def half(_m: Any, _a: Any, out: Any) -> Any:
        return (out[0] * 0.5, *out[1:]) if isinstance(out, tuple) else out * 0.5

    return [model.get_submodule("model.layers.2").register_forward_hook(half),
            model.get_submodule("model.layers.1.mlp").register_forward_hook(lambda _m, _a, out: out + v.to(out))]


def timed(run: Callable[[], Any], device: str, repeats: int) -> float:
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def check(folder: Path, device: str, layers: int, offload: str | None, batch: int, seq: int,
          repeats: int) -> dict[str, str]:
    kwargs: dict[str, Any] = {"device_map": device_map(device, layers, offload)}
    if offload:
        kwargs["offload_folder"] = str(folder / f"offload-{offload}")
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 32000, (batch, seq), generator=torch.Generator().manual_seed(2)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", garage.GarageWarning)  # kept on inj.warnings, shown in the table
        inj = garage.compile(model, SPEC, bind={"v": v.to(device)})
        with torch.no_grad():
            got = inj(input_ids=ids).logits
        tokens = inj.generate(ids[:2, :16], max_new_tokens=8)
    path = "hooks" if inj.fallbacks else "graph"
    handles = reference(model, v)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        want_tokens = model.generate(ids[:2, :16], max_new_tokens=8, do_sample=False, pad_token_id=0)
        hooked_ms = timed(lambda: model(input_ids=ids), device, repeats)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        eager_ms = timed(lambda: model(input_ids=ids), device, repeats)
        garage_ms = timed(lambda: inj(input_ids=ids), device, repeats)
    error = ((got - want).abs().max() / want.abs().max()).item()
    said = sorted({w.rule for w in inj.warnings if w.rule})
    return {"placement": f"{offload or 'none'} offload", "garage runs": path, "warnings": ", ".join(said) or "-",
            "logits vs hook": f"{error:.1e}", "greedy tokens": "equal" if torch.equal(tokens, want_tokens) else "DIFFER",
            "eager ms": f"{eager_ms:.1f}", "hooks ÷ eager": f"{hooked_ms / eager_ms:.2f}×",
            "garage ÷ eager": f"{garage_ms / eager_ms:.2f}×"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a small model and few repeats")
    args = parser.parse_args()
    hidden, layers, batch, seq, repeats = (256, 4, 2, 64, 3) if args.quick else (1024, 8, 4, 256, 10)
    offloads = ["cpu", "disk"] if args.device != "cpu" else ["disk"]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}"
          f", device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"Llama shape: hidden {hidden}, {layers} layers, batch {batch} × {seq}; spec: {SPEC}\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_model(folder, hidden, layers)
        rows = [check(folder, args.device, layers, offload, batch, seq, repeats) for offload in [None, *offloads]]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    main()
