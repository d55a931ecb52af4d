"""Every text architecture in transformers, every site kind garage has, against hand-written hooks.

    python bench/sweep.py                        # every family: a subprocess each, 1 thread, 240 s timeout
    python bench/sweep.py llama mamba bart       # some families
    python bench/sweep.py --jobs 2 --compile 12 --table docs/architectures.md   # the release run

Families are the causal-LM model types of transformers (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`) and the text
encoders (`MODEL_FOR_MASKED_LM_MAPPING_NAMES`), each built from its config class's defaults shrunk to a
tiny size (hidden 64, 4 heads, 4 layers, 4 experts, vocab 128), with random weights.

For each family and each site kind (h.1, h.1.in, h.1.attn, h.1.mlp, embed, final, h.1.attn.heads{0},
h.1.mlp.hidden, h.1.router), `at SITE scale 0.5` (the router: `bias {1} * 8`) is compiled and its logits
compared with the model run eagerly under a reference hook written here: a forward hook, or pre-hook, on
the module garage names for the site (`explain_rows`), with this file's own formula. Where garage refuses
a site, this file judges from the block's own modules whether the kind is there at all (an SSM block has
no attention): a refusal of a kind that is absent is `—`, of one that is present a failure. Generation
compares greedy `inj.generate` with `model.generate` under the hook (5 new tokens). `--compile K` also runs
every K-th family under `torch.compile(fullgraph=True)`.

`--table FILE` writes the markdown table (docs/architectures.md); `--json FILE` keeps the raw rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

TIMEOUT = 240
MEMORY = 8 << 30  # bytes of address space a family may take
KINDS = ("h", "in", "attn", "mlp", "embed", "final", "heads", "hidden", "router")
SITES = {"h": "h.1", "in": "h.1.in", "attn": "h.1.attn", "mlp": "h.1.mlp", "embed": "embed", "final": "final",
         "heads": "h.1.attn.heads{0}", "hidden": "h.1.mlp.hidden", "router": "h.1.router"}
INPUT_KINDS = {"in", "embed", "heads", "hidden"}  # their site is a module's input: a pre-hook
LAYERS, HIDDEN, HEADS, VOCAB = 4, 64, 4, 128
SHRINK: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, n_embd=HIDDEN, d_model=HIDDEN, n_embed=HIDDEN, dim=HIDDEN,
    intermediate_size=128, n_inner=128, ffn_dim=128, d_ff=128, decoder_ffn_dim=128, encoder_ffn_dim=128,
    moe_intermediate_size=32, shared_expert_intermediate_size=32,
    num_attention_heads=HEADS, n_head=HEADS, n_heads=HEADS, num_heads=HEADS, decoder_attention_heads=HEADS,
    encoder_attention_heads=HEADS, num_key_value_heads=2, head_dim=16, rotary_dim=8, use_cache=False, kv_channels=16,
    num_hidden_layers=LAYERS, n_layer=LAYERS, n_layers=LAYERS, num_layers=LAYERS, decoder_layers=LAYERS,
    encoder_layers=LAYERS, max_position_embeddings=128, n_positions=128, n_ctx=128,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_topk=2, top_k=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_shared_experts=1, decoder_sparse_step=1,
    mlp_only_layers=[], pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    mamba_n_heads=8, mamba_d_head=16, mamba_headdim=16,  # × 8 heads = 2 × hidden, the SSM's expanded width
    attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,  # Jamba: some of each
    embedding_size=HIDDEN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0,
    attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)
# Families whose config ties other fields together, or needs a flag to build as a causal LM.
FAMILY: dict[str, dict[str, Any]] = {
    "mamba2": dict(num_heads=8, n_groups=1), "reformer": dict(is_decoder=True, axial_pos_embds_dim=(32, 32), axial_pos_shape=(8, 16)),
    "xlstm": dict(embedding_dim=HIDDEN, num_blocks=LAYERS), "lfm2_moe": dict(num_dense_layers=1),
}
# What a block's modules are called when they are there (the sweep's own judgement, not garage's).
PRESENT: dict[str, tuple[str, ...]] = {
    "attn": ("attention", "attn"), "heads": ("attention", "attn"),
    "mlp": ("mlp", "feedforward", "ffn", "moe", "expert", "intermediate", "densereludense", "densegated"),
    "hidden": ("mlp", "feedforward", "ffn", "moe", "expert", "intermediate", "densereludense", "densegated"),
    "final": ("norm",),
}


# --------------------------------------------------------------------------------------- the family list
def families() -> list[tuple[str, str]]:
    """(model_type, "causal" | "masked"): every causal LM, then every text encoder that is not also one."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    causal = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return [(t, "causal") for t in causal] + [(t, "masked") for t in sorted(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
                                               if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]


def tiny(model_type: str, head: str) -> Any:
    """The family's model, from its config's defaults shrunk to tiny sizes, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    for part in _parts(config):
        if hasattr(part, "allow_global_per_layer_attribute_access"):
            part.allow_global_per_layer_attribute_access = True
        mla = hasattr(part, "qk_rope_head_dim")  # multi-head latent attention: as many kv heads as heads
        shrink = dict(SHRINK, head_dim=8 if mla else 16, num_key_value_heads=HEADS if mla else 2,
                      **FAMILY.get(model_type, {}))
        layers = getattr(part, "num_hidden_layers", None)
        for key, value in shrink.items():
            if hasattr(part, key) and not (key.endswith("token_id") and _small(getattr(part, key))):
                old = getattr(part, key)
                try:
                    setattr(part, key, type(old)(value) if isinstance(old, (int, float)) and
                            isinstance(value, (int, float)) and not isinstance(old, bool) else value)
                except Exception:  # a derived property, or a strict field of another type: leave it
                    pass
        for key, value in list(vars(part).items()):
            if isinstance(value, list) and layers and len(value) == layers and layers != LAYERS:
                setattr(part, key, _spread(value))  # per-layer lists follow the layer count
            elif "vocab" in key and isinstance(value, int) and value > VOCAB:
                setattr(part, key, VOCAB)  # BLT's hash vocabularies
    torch.manual_seed(0)
    auto = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "seq2seq": AutoModelForSeq2SeqLM}[head]
    return auto.from_config(config).float().eval()


def _parts(config: Any) -> list[Any]:
    """The config and every config inside it (text, encoder, decoder, patcher, …), each once."""
    from transformers import PretrainedConfig

    found: dict[int, Any] = {}
    stack = [config, config.get_text_config()]
    while stack:
        part = stack.pop()
        if id(part) not in found:
            found[id(part)] = part
            stack += [v for v in vars(part).values() if isinstance(v, PretrainedConfig)]
    return list(found.values())


def _small(value: Any) -> bool:
    return isinstance(value, int) and 0 <= value < VOCAB


def _spread(values: list) -> list:
    """LAYERS items of a per-layer list, keeping each kind it has (a hybrid keeps its attention layers)."""
    firsts = [i for i, v in enumerate(values) if v not in values[:i]][:LAYERS]
    rest = [i for i in range(len(values)) if i not in firsts]
    return [values[i] for i in sorted(firsts + rest[: LAYERS - len(firsts)])]


# --------------------------------------------------------------------------------------- references
def _scaled_first(value: Any, fn: Callable) -> Any:
    """`fn` applied to the hidden state in a module's output or arguments: a tensor, or a tuple's first."""
    import torch

    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        items = [fn(value[0]), *value[1:]]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a namedtuple
    if hasattr(value, "to_tuple"):
        key = next(iter(value.keys()))
        value[key] = fn(value[key])
        return value
    raise TypeError(f"no hidden state in a {type(value).__name__}")


def reference_hooks(model: Any, kind: str, path: str, head_size: int) -> list:
    """This file's own hook for a kind: × 0.5 on the module's output, or on its input (heads: the first
    head's channels only), or + 8 on expert 1's logit (the first F.linear inside the router)."""
    import torch

    target = model.get_submodule(path)
    half = (lambda h: h * 0.5) if kind != "heads" else (lambda h: torch.cat([h[..., :head_size] * 0.5,
                                                                               h[..., head_size:]], -1))
    if kind == "router":
        return _router_hooks(target)
    if kind in INPUT_KINDS:
        def pre(_m: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                return (half(args[0]),) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": half(kwargs["hidden_states"])}
        return [target.register_forward_pre_hook(pre, with_kwargs=True)]
    return [target.register_forward_hook(lambda _m, _a, out: _scaled_first(out, half))]


def _router_hooks(router: Any) -> list:
    import torch
    from torch.overrides import TorchFunctionMode

    class FirstLinear(TorchFunctionMode):
        done = False

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if func is torch.nn.functional.linear and not self.done:
                self.done = True
                out = out.clone()
                out[..., 1] += 8
            return out

    modes: list = []

    def enter(*_: Any) -> None:
        modes.append(FirstLinear())
        modes[-1].__enter__()

    return [router.register_forward_pre_hook(enter),
            router.register_forward_hook(lambda *_: modes.pop().__exit__(None, None, None), always_call=True)]


def present(model: Any, blocks: str, kind: str) -> bool:
    """Whether block 1 (or the base model, for `final`) has a module of this kind, judged by class names."""
    if kind in ("h", "in", "embed"):
        return True
    block = [type(m).__name__.lower() for _, m in model.get_submodule(f"{blocks}.1").named_modules()]
    if kind == "router":  # block 1 routes: some of its modules are experts
        return any(word in name for name in block for word in ("expert", "moe", "sparse"))
    if kind == "hidden" and any(word in name for name in block for word in ("expert", "moe", "sparse")):
        return False  # each expert has its own hidden layer: there is no one down projection
    if kind == "heads" and not getattr(model.config.get_text_config(), "num_attention_heads", 0):
        return False  # attention with no heads to split (RWKV's time mixing)
    if kind == "final":  # a norm in the base model, outside the blocks, the embeddings and other towers
        base = blocks.split(".")[0] + "."
        pool = [type(m).__name__.lower() for n, m in model.named_modules() if n.startswith(base)
                and not n.startswith(blocks + ".") and not any(w in n.lower() for w in ("embed", "vision", "visual", "image"))]
    else:
        pool = block
    return any(word in name for name in pool for word in PRESENT[kind])


# --------------------------------------------------------------------------------------- one family
def one(model_type: str, head: str, compile_it: bool) -> dict[str, Any]:
    """Every check on one family (run in its own process). Each result is "ok", "ok (hooks)", "absent: …",
    "n/a" or a failure message."""
    import warnings

    import torch

    import garage

    torch.set_num_threads(1)
    row: dict[str, Any] = {"family": model_type, "head": head}
    try:
        model = tiny(model_type, head)
        ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # left padding
        inputs = {"input_ids": ids, "attention_mask": mask}
        with torch.no_grad():
            plain = _logits(model(**inputs))
    except Exception as err:
        row["build"] = _why(err)
        return row
    row["build"] = "ok"
    try:
        info = garage.plan.archs.ModelInfo.from_model(model)
        blocks = info.blocks
    except Exception as err:
        row["blocks"] = _why(err)
        return row
    head_size = info.head_size or 1
    block_path = ""
    for kind in KINDS:
        row[kind], path = _site(model, kind, inputs, plain, blocks, head_size)
        block_path = path if kind == "h" else block_path
    row["generate"] = _generation(model, ids, block_path) if head == "causal" else "n/a"
    if compile_it and row["h"].startswith("ok"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["compile"] = _compiled(model, inputs, block_path)
    return row


def _logits(out: Any) -> Any:
    return out.logits if hasattr(out, "logits") else out[0]


def _why(err: BaseException) -> str:
    errors = [d.message for d in getattr(err, "diagnostics", []) if d.is_error]  # a GarageError: its first error
    text = errors[:1] or str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def _site(model: Any, kind: str, inputs: dict, plain: Any, blocks: str, head_size: int) -> tuple[str, str]:
    import warnings

    import torch

    import garage

    op = "bias {1} * 8" if kind == "router" else "scale 0.5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            inj = garage.compile(model, f"at {SITES[kind]} {op}")
            path = inj.explain_rows()[0]["module_path"]
            with torch.no_grad():
                got = _logits(inj(**inputs))
        except garage.ResolveError as err:
            message = err.diagnostics[0].message
            if present(model, blocks, kind):
                return f"refused, though block 1 has it: {message}"[:200], ""
            return f"absent: {message}"[:200], ""
        except Exception as err:
            return _why(err), ""
    hooked = any("[hook-fallback]" in str(w.message) for w in caught)
    handles = reference_hooks(model, kind, path, head_size)
    try:
        with torch.no_grad():
            want = _logits(model(**inputs))
    except Exception as err:
        return f"the reference hook failed: {_why(err)}", path
    finally:
        for handle in handles:
            handle.remove()
    error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    if error > 1e-4:
        return f"differs from the hook by {error:.2g} (at {path})", path
    if torch.equal(got, plain):  # equal to the hook, which did nothing either: a norm after it undoes a scale
        return f"ok (scaling here does not change the logits, with the hook too; at {path})", path
    return ("ok (hooks)" if hooked else "ok"), path


def _generation(model: Any, ids: Any, block: str) -> str:
    import warnings

    import torch

    import garage

    if not block:
        return "no h.1 site"
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            inj = garage.compile(model, "at h.1 scale 0.5")
            got = inj.generate(ids, max_new_tokens=5, pad_token_id=pad)
        except Exception as err:
            return _why(err)
    hooked = any("[hook-fallback]" in str(w.message) for w in caught)
    handles = reference_hooks(model, "h", block, 1)
    try:
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                  pad_token_id=pad)
    except Exception as err:
        return f"model.generate failed: {_why(err)}"
    finally:
        for handle in handles:
            handle.remove()
    if got.shape != want.shape or not torch.equal(got, want):
        return f"tokens differ: {got[:, ids.shape[1]:].tolist()} vs {want[:, ids.shape[1]:].tolist()}"
    return "ok (hooks)" if hooked else "ok"


def _compiled(model: Any, inputs: dict, block: str) -> str:
    import torch

    import garage

    try:
        inj = garage.compile(model, "at h.1 scale 0.5", compile={"fullgraph": True})
        with torch.no_grad():
            got = _logits(inj(**inputs))
    except Exception as err:
        return _why(err)
    handles = reference_hooks(model, "h", block, 1)
    with torch.no_grad():
        want = _logits(model(**inputs))
    for handle in handles:
        handle.remove()
    error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    return "ok" if error <= 1e-4 else f"differs by {error:.2g}"


# --------------------------------------------------------------------------------------- the run
def _memory_limit() -> None:
    """A family whose config escapes shrinking must fail alone, not take the machine's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def run_one(model_type: str, head: str, compile_it: bool, timeout: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--one", model_type, head] + ["--compile-one"] * compile_it
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              preexec_fn=_memory_limit)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"family": model_type, "head": head,
                                                   "build": f"crashed: {done.stderr.strip()[-200:]}"}
    except subprocess.TimeoutExpired:
        row = {"family": model_type, "head": head, "build": f"timeout: over {timeout} s"}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def passes(row: dict[str, Any]) -> bool:
    """Every site kind the family has, and generation where it generates: equal to the hooks."""
    checks = [row.get(kind, "") for kind in KINDS] + [row.get("generate", "")]
    return row.get("build") == "ok" and all(c.startswith(("ok", "absent", "n/a")) for c in checks)


def block_outputs_pass(row: dict[str, Any]) -> bool:
    return row.get("build") == "ok" and row.get("h", "").startswith("ok")


def table(rows: list[dict[str, Any]], seconds: float) -> str:
    import torch
    import transformers

    def cell(value: str | None) -> str:
        if value is None:
            return ""
        if value in ("ok", "n/a"):
            return "✓" if value == "ok" else "n/a"
        if value == "ok (hooks)":
            return "✓ hooks"
        if value.startswith("absent"):
            return "—"
        return "✗"

    built = [r for r in rows if r.get("build") == "ok"]
    full = [r for r in rows if passes(r)]
    hooks = [r for r in full if any(str(r.get(k, "")).endswith("(hooks)") for k in (*KINDS, "generate"))]
    lines = [
        "# Architectures",
        "",
        "Generated by `python bench/sweep.py --table docs/architectures.md` (do not edit by hand): every causal-LM "
        "and text-encoder model type in transformers, built tiny with random weights, each site kind compiled "
        "with `scale 0.5` (the router: `bias {1} * 8`) and compared with a hand-written hook on the module "
        "garage names; greedy generation compared with `model.generate` under the hook. ✓ equal; ✓ hooks: equal, "
        "through the hook backend that garage falls back to, with a warning, where torch.export cannot trace "
        "the model or its cache; — the family has no such part, and garage says so; ✗ see the notes.",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}; {len(rows)} families, "
        f"{seconds / 60:.0f} minutes.",
        "",
        "**Deferred: encoder–decoder models.** T5, and the full seq2seq models of BART and its kin, are not "
        "swept: their sites would be spelled `encoder.h.I` and `decoder.h.I`, which the language does not have "
        "yet. BART, mBART, Pegasus, Blenderbot and the others appear below as the decoder-only causal LMs that "
        "transformers has for them.",
        "",
        "| | families |",
        "|---|---|",
        f"| attempted | {len(rows)} |",
        f"| built as tiny models | {len(built)} |",
        f"| block outputs (`h.I`) equal to the hook | {sum(block_outputs_pass(r) for r in rows)} |",
        f"| every site kind + generation | {len(full)} (of which {len(hooks)} by the hook fallback) |",
        "",
        "| family | head | " + " | ".join(SITES[k] for k in KINDS) + " | generate | compile | notes |",
        "|" + "---|" * (len(KINDS) + 5),
    ]
    for r in rows:
        notes = "; ".join(f"{k}: {r[k]}" for k in ("build", "blocks", *KINDS, "generate", "compile")
                          if isinstance(r.get(k), str) and not r[k].startswith(("ok", "n/a")))
        cells = [cell(r.get(k)) for k in (*KINDS, "generate", "compile")]
        lines.append(f"| {r['family']} | {r['head']} | " + " | ".join(cells) + f" | {notes.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("families", nargs="*", help="model types (default: every one)")
    parser.add_argument("--jobs", type=int, default=1, help="families at a time, 1 thread each")
    parser.add_argument("--compile", type=int, default=0, metavar="K", help="torch.compile every K-th family")
    parser.add_argument("--timeout", type=int, default=TIMEOUT)
    parser.add_argument("--table", help="write the markdown table here")
    parser.add_argument("--json", help="write the raw rows here")
    args = parser.parse_args()
    every = families()
    chosen = [f for f in every if not args.families or f[0] in args.families]
    start = time.perf_counter()

    def go(i_family: tuple[int, tuple[str, str]]) -> dict[str, Any]:
        i, (model_type, head) = i_family
        row = run_one(model_type, head, bool(args.compile) and i % args.compile == 0, args.timeout)
        mark = "pass" if passes(row) else "FAIL"
        print(f"{model_type:28} {head:6} {mark} {row['seconds']:6.1f}s  " +
              "; ".join(f"{k}: {v}" for k, v in row.items() if isinstance(v, str) and not v.startswith(("ok", "n/a"))
                        and k not in ("family", "head")), flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(go, enumerate(chosen)))
    seconds = time.perf_counter() - start
    print(f"\n{sum(map(passes, rows))} of {len(rows)} families pass every site kind + generation; "
          f"{sum(map(block_outputs_pass, rows))} pass block outputs; {seconds / 60:.1f} minutes")
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if args.table:
        Path(args.table).write_text(table(rows, seconds))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2], sys.argv[3], "--compile-one" in sys.argv)))
    else:
        sys.exit(main())
