"""Router control on every MoE family in transformers: does `h.I.router` resolve, and do `bias {1, 2} * 8` and
`force 3` there equal the tests' reference (the router's first `F.linear` result, changed by the tests' own
formulas, from tests/test_heads_and_routers.py)?

    python bench/moe_sweep.py                 # every MoE causal-LM family (a subprocess each, 120 s timeout)
    python bench/moe_sweep.py mixtral olmoe   # some families

Each family is built from its config class's defaults shrunk to a tiny size (hidden 64, 4 heads, 4 experts,
top-2, 2 to 4 layers). A family whose tiny config does not build, or whose model does not run, is listed
with the reason; so is one whose router garage does not find. The table is for bench/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SHRINK = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=4, head_dim=16, num_hidden_layers=4, max_position_embeddings=128, num_experts=4,
    num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_topk=2, top_k=2,
    n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=16, first_k_dense_replace=1, shared_expert_intermediate_size=32, n_shared_experts=1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_sparse_step=1, mlp_only_layers=[],
)
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def moe_families() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            text = CONFIG_MAPPING[model_type]().get_text_config()
        except Exception:  # a config without defaults, or several text configs: not swept here
            continue
        if any(isinstance(getattr(text, k, None), int) and getattr(text, k) > 1 for k in EXPERT_KEYS):
            found.append(model_type)
    return found


def one(model_type: str) -> dict[str, str]:
    """Build, resolve, and check the router ops of one family (run in a subprocess)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import garage
    from garage.plan.archs import ModelInfo

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    # the tests' reference (the router's first F.linear result) and their own formulas for the ops
    from test_heads_and_routers import ROUTER_OPS, router_reference

    config = CONFIG_MAPPING[model_type]()
    text = config.get_text_config()
    if hasattr(text, "allow_global_per_layer_attribute_access"):  # heterogeneous configs: shrink every layer alike
        text.allow_global_per_layer_attribute_access = True
    # MLA families rotate `head_dim` = qk_rope_head_dim channels; hybrids' linear-attention caches are off.
    shrink = dict(SHRINK, use_cache=False,
                  head_dim=SHRINK["qk_rope_head_dim"] if hasattr(text, "qk_rope_head_dim") else SHRINK["head_dim"])
    for key, value in shrink.items():
        if hasattr(text, key):
            try:
                setattr(text, key, value)
            except AttributeError:  # a derived property (Jamba's layer_types): leave it
                pass
    for key in ("layer_types", "mlp_layer_types"):  # per-layer lists follow the layer count
        if isinstance(getattr(text, key, None), list):
            try:
                setattr(text, key, (getattr(text, key) * 4)[: text.num_hidden_layers])
            except AttributeError:
                pass
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float().eval()
        ids = torch.randint(3, 128, (2, 7))
        with torch.no_grad():
            plain = model(input_ids=ids).logits
    except Exception as err:
        return {"status": "skipped", "why": f"tiny config does not build or run: {type(err).__name__}: {err}"[:160]}
    info = ModelInfo.from_model(model)
    if info.router is None:
        return {"status": "no router", "why": "garage finds no `gate`/`router` module that scores experts"}
    layer = next(i for i in range(info.num_layers) if info.has(i, info.router))

    results = {}
    path = f"{info.block(layer)}.{info.router}"
    for op in ("bias {1, 2} * 8", "force 3"):
        try:
            inj = garage.compile(model, f"at h.{layer}.router {op}")
            with torch.no_grad():
                got = inj(input_ids=ids).logits
        except Exception as err:  # a diagnostic, or a failure inside torch.export or the graph (issue 16's)
            return {"status": "fails", "why": f"{type(err).__name__}: {str(err).splitlines()[0]}"[:160],
                    "router": info.router}
        want = router_reference(model, {"input_ids": ids}, path, ROUTER_OPS[op]({}))
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        results[op] = "equal" if error <= 1e-5 else f"differs by {error:.2g}"
        if torch.equal(got, plain):
            results[op] += " (no effect)"
    ok = all(v == "equal" for v in results.values())
    return {"status": "ok" if ok else "differs", "why": ", ".join(f"{k}: {v}" for k, v in results.items()),
            "router": info.router, "experts": str(info.experts), "layer": str(layer)}


def main(names: list[str]) -> int:
    families = names or moe_families()
    rows = []
    for name in families:
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=120)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"status": "crashed", "why": done.stderr.strip()[-160:]}
        except subprocess.TimeoutExpired:
            result = {"status": "timeout", "why": "over 120 s"}
        result["seconds"] = f"{time.perf_counter() - start:.0f}"
        rows.append((name, result))
        print(f"{name:24} {result['status']:10} {result.get('router', '-'):26} {result['why']}", flush=True)
    counts: dict[str, int] = {}
    for _, result in rows:
        counts[result["status"]] = counts.get(result["status"], 0) + 1
    print("\n| family | result | router | notes |\n|---|---|---|---|")
    for name, result in rows:
        print(f"| {name} | {result['status']} | {result.get('router', '-')} | {result['why']} |")
    print("\n" + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return 0 if all(r["status"] in ("ok", "skipped") for _, r in rows) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2])))
    else:
        sys.exit(main(sys.argv[1:]))
