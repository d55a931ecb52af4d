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
# An encoder–decoder family's checks: (site, the kind of module the reference hook acts on, its stack).
SEQ2SEQ_SITES: dict[str, tuple[str, str, str]] = {
    "enc": ("encoder.h.1", "h", "encoder"), "enc.in": ("encoder.h.1.in", "in", "encoder"),
    "enc.attn": ("encoder.h.1.attn", "attn", "encoder"), "enc.mlp": ("encoder.h.1.mlp", "mlp", "encoder"),
    "enc.hidden": ("encoder.h.1.mlp.hidden", "hidden", "encoder"), "dec": ("decoder.h.1", "h", "decoder"),
    "dec.attn": ("decoder.h.1.attn", "attn", "decoder"), "cross": ("decoder.h.1.cross", "cross", "decoder"),
    "dec.mlp": ("decoder.h.1.mlp", "mlp", "decoder"), "dec.heads": ("decoder.h.1.attn.heads{0}", "heads", "decoder"),
    "dec.final": ("decoder.final", "final", "decoder"),
}
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
# Fields shared by two families below.
_QWEN4 = dict(  # Qwen4-Exp: its indexed-attention layers need their token indexer set; thinner linear attention
    indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, hc_lowrank=16)
_ZAMBA = dict(  # Zamba: attention on 2 × hidden, fixed before shrinking; 2 hybrid layers, to share one transformer
    attention_hidden_size=2 * HIDDEN, attention_head_dim=2 * HIDDEN // HEADS,
    layers_block_type=["linear_attention", "hybrid"] * 2)
_DRAFTER = dict(num_kv_shared_layers=LAYERS, backbone_hidden_size=HIDDEN)  # Gemma 4 assistants: every layer reads
# the target model's kv. They build, but their forward needs the target's embeddings and kv states, so cannot run alone.
# Families whose config ties other fields together, needs a flag to build as a causal LM, or has sizes SHRINK misses.
FAMILY: dict[str, dict[str, Any]] = {
    "mamba2": dict(num_heads=8, n_groups=1), "reformer": dict(is_decoder=True, axial_pos_embds_dim=(32, 32), axial_pos_shape=(8, 16)),
    "xlstm": dict(embedding_dim=HIDDEN, num_blocks=LAYERS),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"] * 2),  # no default: a hybrid
    "blt": dict(hidden_size_global=HIDDEN, encoder_cross_output_size=2 * HIDDEN),  # the decoder reads the global
    # model's width; the global model reads cross_attn_k (2) encoder widths, a sum fixed before shrinking
    "falcon_h1": dict(mamba_d_ssm=2 * HIDDEN, mamba_d_state=16),  # the SSM's width: mamba_n_heads × mamba_d_head
    "dbrx": dict(ffn_hidden_size=128, clip_qkv=8.0),  # no clip (the default) is a clamp with no bounds, an error
    "gemma3n_text": dict(  # the last 2 layers reuse the kv of the first 2, so both layer types must come first
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2, intermediate_size=[128] * 4,
        hidden_size_per_layer_input=16, laurel_rank=8),
    "gemma4_assistant": _DRAFTER, "gemma4_unified_assistant": _DRAFTER,
    "qwen4_exp": _QWEN4, "qwen4_exp_text": _QWEN4,
    "zamba": _ZAMBA | dict(mamba_dt_rank=4),
    "zamba2": _ZAMBA | dict(hybrid_layer_ids=[1, 3], adapter_rank=8, mamba_d_state=16),
    "musicgen": dict(num_codebooks=1), "musicgen_melody": dict(num_codebooks=1),  # a row of ids: one codebook's
    "longcat_flash": dict(qk_head_dim=16, ffn_hidden_size=128, expert_ffn_hidden_size=32, zero_expert_num=2),  # qk:
    # nope + rope, summed before shrinking; zero experts: the identity experts beside the routed ones
    "hrm_text": dict(num_layers_per_stack=LAYERS, num_hidden_layers=LAYERS * 2 * (3 + 1)),  # 4 layers a stack; the
    # cache has a slot per layer per cycle: num_layers_per_stack × H_cycles × (L_cycles + 1), fixed before shrinking
    "inkling2_loop_text": dict(  # the loop (layers 6-17 of 24) inside 4 layers: layers 2-3, run 3 times
        n_layers_per_attn_res_block=2, loop_layer_index_start=2, loop_layer_index_end=4),
    "xmod": dict(default_language="en_XX"),  # whose language adapter runs (as `model.set_default_language` sets)
    "esmc": dict(num_key_value_heads=HEADS),  # its q and k norms span all heads: each as wide as the model
    "perceiver": dict(d_latents=HIDDEN, num_latents=16, num_self_attends_per_block=LAYERS),  # its blocks: self_attends
}
# Constructor arguments, for families whose default config cannot be built, or lacks a field the model reads.
CONFIG_ARGS: dict[str, dict[str, Any]] = {
    "cohere_compass_text": dict(rope_parameters={  # RoPE per layer type; M-RoPE sections summing to head_dim / 2
        "full_attention": dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2])}),
    "dbrx": dict(attn_config=dict(rope_theta=10000.0)),  # the attention reads attn_config.rope_theta
    "gemma4_assistant": dict(text_config=dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)),
}
# Families whose causal LM is built from one part of the config: MusicGen's is its decoder alone.
PART: dict[str, str] = {"musicgen": "decoder", "musicgen_melody": "decoder"}
# Generation settings that a family's own generate needs and its checkpoints keep in generation_config.json.
GENERATION: dict[str, dict[str, Any]] = {  # MusicGen starts (and pads) its delay pattern with this token, and its
    # own generate reads num_return_sequences where transformers now leaves it unset
    "musicgen": dict(decoder_start_token_id=1, num_return_sequences=1),
    "musicgen_melody": dict(decoder_start_token_id=1, num_return_sequences=1),
}
# What a block's modules are called when they are there (the sweep's own judgement, not garage's).
PRESENT: dict[str, tuple[str, ...]] = {
    "attn": ("attention", "attn"), "heads": ("attention", "attn"),
    "mlp": ("mlp", "feedforward", "ffn", "moe", "expert", "intermediate", "densereludense", "densegated"),
    "hidden": ("mlp", "feedforward", "ffn", "moe", "expert", "intermediate", "densereludense", "densegated"),
    "final": ("norm",), "cross": ("attention", "attn"),
}


# --------------------------------------------------------------------------------------- the family list
def families() -> list[tuple[str, str]]:
    """(model_type, "causal" | "masked" | "seq2seq"): every causal LM, then every text encoder that is not also
    one, then every text encoder–decoder model (its full seq2seq class)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    causal = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return ([(t, "causal") for t in causal] + [(t, "masked") for t in sorted(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
                                                if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
            + [(t, "seq2seq") for t in sorted(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES) if _encoder_decoder(t)])


def _encoder_decoder(model_type: str) -> bool:
    """Whether the family's config says it is an encoder–decoder model: the seq2seq mapping also holds
    decoders with an audio tower (Voxtral, Qwen2-Audio, …), whose language model is swept as a causal LM."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return bool(CONFIG_MAPPING[model_type](**CONFIG_ARGS.get(model_type, {})).is_encoder_decoder)
    except Exception:  # a default config that cannot be built: let the sweep say so
        return True


def tiny(model_type: str, head: str) -> Any:
    """The family's model, from its config's defaults shrunk to tiny sizes, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type](**CONFIG_ARGS.get(model_type, {}))
    for part in _parts(config):
        if hasattr(part, "allow_global_per_layer_attribute_access"):
            part.allow_global_per_layer_attribute_access = True
        mla = hasattr(part, "qk_rope_head_dim")  # multi-head latent attention: as many kv heads as heads
        shrink = {**SHRINK, "head_dim": 8 if mla else 16, "num_key_value_heads": HEADS if mla else 2,
                  **FAMILY.get(model_type, {})}  # a family's own fields win
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
    if model_type in PART:  # the class the auto mapping names, on one part of the config
        model = auto._model_mapping[type(config)]._from_config(getattr(config, PART[model_type]))
    else:
        model = auto.from_config(config)
    for key, value in GENERATION.get(model_type, {}).items():
        setattr(model.generation_config, key, value)
    start = model.generation_config if head == "seq2seq" else None
    if start is not None and start.decoder_start_token_id is None:  # checkpoints set it (T5's decoder starts at pad)
        start.decoder_start_token_id = start.pad_token_id if start.pad_token_id is not None else 0
    return model.float().eval()


def _parts(config: Any) -> list[Any]:
    """The config and every config inside it (text, encoder, decoder, patcher, …), each once."""
    from transformers import PretrainedConfig

    found: dict[int, Any] = {}
    stack = [config, config.get_text_config(decoder=True)]  # decoder: MusicGen has a text encoder too
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
    if isinstance(value, dict) and value:  # SqueezeBERT's attention returns {"context_layer": …}
        key = next(iter(value))
        return {**value, key: fn(value[key])}
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
    # block 1's modules, not the block itself (OLMo-Hybrid's `…LinearAttentionDecoderLayer` has no attention)
    block = [type(m).__name__.lower() for n, m in model.get_submodule(f"{blocks}.1").named_modules() if n]
    routes = any("expert" in name or "sparse" in name or name.endswith(("moe", "moeblock")) for name in block)
    if kind == "router":  # block 1 routes: some of its modules are experts (GlmMoeDsa's dense `…MoeDsaMLP` is not)
        return routes
    if kind == "hidden" and routes:
        return False  # each expert has its own hidden layer: there is no one down projection
    if kind == "heads" and not getattr(model.config.get_text_config(), "num_attention_heads", 0):
        return False  # attention with no heads to split (RWKV's time mixing)
    if kind == "final":  # a norm beside the blocks, or beside a module holding them: not one nested in another
        parts = blocks.split(".")  # module (Qwen4-Exp's hyper-connection mixer), nor the embeddings' or a tower's
        ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
        pool = [type(m).__name__.lower() for a in ancestors for n, m in model.get_submodule(a).named_children()
                if f"{a}.{n}" != blocks and not any(w in n.lower() for w in ("embed", "vision", "visual", "image"))]
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
    if head == "seq2seq":
        return one_seq2seq(model_type)
    row: dict[str, Any] = {"family": model_type, "head": head}
    try:
        model, ids, inputs, plain = _built(model_type, head)
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
        row[kind], path = _site(model, SITES[kind], kind, inputs, plain, blocks, head_size)
        block_path = path if kind == "h" else block_path
    row["generate"] = _generation(model, ids, block_path) if head == "causal" else "n/a"
    if compile_it and row["h"].startswith("ok"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["compile"] = _compiled(model, inputs, block_path)
    return row


def one_seq2seq(model_type: str) -> dict[str, Any]:
    """Every check on one encoder–decoder family: SEQ2SEQ_SITES on a left-padded source and a target, and
    greedy generation with `at decoder.h.1 scale 0.5`."""
    import garage

    row: dict[str, Any] = {"family": model_type, "head": "seq2seq"}
    try:
        model, ids, inputs, plain = _built(model_type, "seq2seq")
    except Exception as err:
        row["build"] = _why(err)
        return row
    row["build"] = "ok"
    try:
        stacks = garage.plan.archs.ModelInfo.from_model(model).stacks
        if not stacks:
            raise TypeError("garage does not find an encoder and a decoder (get_encoder(), get_decoder())")
    except Exception as err:
        row["blocks"] = _why(err)
        return row
    decoder_block = ""
    for key, (site, kind, stack) in SEQ2SEQ_SITES.items():
        row[key], path = _site(model, site, kind, inputs, plain, stacks[stack].blocks, stacks[stack].head_size or 1)
        decoder_block = path if key == "dec" else decoder_block
    row["generate"] = _generation(model, ids, decoder_block, "decoder.h.1")
    return row


def _built(model_type: str, head: str) -> tuple[Any, Any, dict, Any]:
    """The family's tiny model, its ids, its inputs (left-padded ids and their mask; an encoder–decoder model's
    also a target) and its plain logits on them."""
    import torch

    model = tiny(model_type, head)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    inputs = {"input_ids": ids, "attention_mask": mask}
    if head == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    with torch.no_grad():
        plain = _logits(model(**inputs))
    return model, ids, inputs, plain


def kinds_of(row: dict[str, Any]) -> tuple[str, ...]:
    """The site checks of a row: the encoder–decoder ones, or the others'."""
    return tuple(SEQ2SEQ_SITES) if row.get("head") == "seq2seq" else KINDS


def _logits(out: Any) -> Any:
    return out.logits if hasattr(out, "logits") else out[0]


def _why(err: BaseException) -> str:
    errors = [d.message for d in getattr(err, "diagnostics", []) if d.is_error]  # a GarageError: its first error
    text = errors[:1] or str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def _site(model: Any, site: str, kind: str, inputs: dict, plain: Any, blocks: str, head_size: int) -> tuple[str, str]:
    """`site` compiled with one op, against this file's hook on the module garage names (of `kind`)."""
    import warnings

    import torch

    import garage

    op = "bias {1} * 8" if kind == "router" else "scale 0.5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            inj = garage.compile(model, f"at {site} {op}")
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


def _generation(model: Any, ids: Any, block: str, site: str = "h.1") -> str:
    """Greedy tokens of `at SITE scale 0.5` against `model.generate` under this file's hook on `block`."""
    import warnings

    import torch

    import garage

    if not block:
        return f"no {site} site"
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            inj = garage.compile(model, f"at {site} scale 0.5")
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
        return f"tokens differ: {got[:, -5:].tolist()} vs {want[:, -5:].tolist()}"
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
    checks = [row.get(kind, "") for kind in kinds_of(row)] + [row.get("generate", "")]
    return row.get("build") == "ok" and all(c.startswith(("ok", "absent", "n/a")) for c in checks)


def block_outputs_pass(row: dict[str, Any]) -> bool:
    return row.get("build") == "ok" and all(row.get(k, "").startswith("ok") for k in
                                            (("enc", "dec") if row.get("head") == "seq2seq" else ("h",)))


def table(rows: list[dict[str, Any]]) -> str:
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

    def totals(group: list[dict[str, Any]], outputs: str) -> list[str]:
        full = [r for r in group if passes(r)]
        hooks = [r for r in full if any(str(r.get(k, "")).endswith("(hooks)") for k in (*kinds_of(r), "generate"))]
        return ["| | families |", "|---|---|", f"| attempted | {len(group)} |",
                f"| built as tiny models | {sum(r.get('build') == 'ok' for r in group)} |",
                f"| {outputs} equal to the hook | {sum(block_outputs_pass(r) for r in group)} |",
                f"| every site kind + generation | {len(full)} (of which {len(hooks)} by the hook fallback) |"]

    def rows_of(group: list[dict[str, Any]], kinds: tuple[str, ...]) -> list[str]:
        lines = []
        for r in group:
            notes = "; ".join(f"{k}: {r[k]}" for k in ("build", "blocks", *kinds, "generate", "compile")
                              if isinstance(r.get(k), str) and not r[k].startswith(("ok", "n/a")))
            cells = [cell(r.get(k)) for k in (*kinds, "generate", "compile")]
            lines.append(f"| {r['family']} | {r['head']} | " + " | ".join(cells) + f" | {notes.replace('|', '/')} |")
        return lines

    single = [r for r in rows if r["head"] != "seq2seq"]
    pairs = [r for r in rows if r["head"] == "seq2seq"]
    pair_sites = [site for site, _kind, _stack in SEQ2SEQ_SITES.values()]
    lines = [
        "# Architectures",
        "",
        "Generated by `python bench/sweep.py --table docs/architectures.md` (do not edit by hand): every causal-LM, "
        "text-encoder and text encoder–decoder model type in transformers, built tiny with random weights, each "
        "site kind compiled with `scale 0.5` (the router: `bias {1} * 8`) and compared with a hand-written hook on "
        "the module garage names; greedy generation compared with `model.generate` under the hook. ✓ equal; "
        "✓ hooks: equal, through the hook backend that garage falls back to, with a warning, where torch.export "
        "cannot trace the model or its cache; — the family has no such part, and garage says so; ✗ see the notes. "
        "What discovery finds in each family is in [discovery.md](discovery.md).",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}; {len(rows)} families, "
        f"{sum(r.get('seconds', 0) for r in rows) / 120:.0f} minutes of families on two cores (`--jobs 2`).",
        "",
        *totals(single, "block outputs (`h.I`)"),
        "",
        "| family | head | " + " | ".join(SITES[k] for k in KINDS) + " | generate | compile | notes |",
        "|" + "---|" * (len(KINDS) + 5),
        *rows_of(single, KINDS),
        "",
        "## Encoder–decoder families",
        "",
        "Their full seq2seq classes, with the sites of each stack (`encoder.h.I`, `decoder.h.I`, "
        "`decoder.h.I.cross`, …) on a left-padded source and a target; generation is `at decoder.h.1 scale 0.5`. "
        "BART, mBART, Pegasus and the others also appear above as the decoder-only causal LMs transformers has "
        "for them.",
        "",
        *totals(pairs, "block outputs of both stacks"),
        "",
        "| family | head | " + " | ".join(pair_sites) + " | generate | compile | notes |",
        "|" + "---|" * (len(pair_sites) + 5),
        *rows_of(pairs, tuple(SEQ2SEQ_SITES)),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("families", nargs="*", help="model types (default: every one)")
    parser.add_argument("--jobs", type=int, default=1, help="families at a time, 1 thread each")
    parser.add_argument("--compile", type=int, default=0, metavar="K", help="torch.compile every K-th family")
    parser.add_argument("--timeout", type=int, default=TIMEOUT)
    parser.add_argument("--table", help="write the markdown table here")
    parser.add_argument("--json", help="write the raw rows here")
    parser.add_argument("--rows", help="start from the rows of an earlier --json run, running only the families "
                        "named (to refresh a few rows of the table)")
    args = parser.parse_args()
    every = families()
    chosen = [f for f in every if (not args.families and not args.rows) or f[0] in args.families]
    earlier = [row for line in Path(args.rows).read_text().splitlines() if (row := json.loads(line)) and
               (row["family"], row["head"]) in every] if args.rows else []  # families still swept
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
        fresh = {(r["family"], r["head"]): r for r in pool.map(go, enumerate(chosen))}
    seconds = time.perf_counter() - start
    rows = [fresh.pop((r["family"], r["head"]), r) for r in earlier] + list(fresh.values()) if earlier else list(fresh.values())
    print(f"\n{sum(map(passes, rows))} of {len(rows)} families pass every site kind + generation; "
          f"{sum(map(block_outputs_pass, rows))} pass block outputs; {seconds / 60:.1f} minutes")
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if args.table:
        Path(args.table).write_text(table(rows))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2], sys.argv[3], "--compile-one" in sys.argv)))
    else:
        sys.exit(main())
