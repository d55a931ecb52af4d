"""Architectures garage has no table row for, found by discovery; models it cannot trace, run by hooks.

The families span the structural variants of `bench/sweep.py`'s table (docs/architectures.md): Conv1D and
Linear projections, BERT's and BART's block layouts, names garage does not know (CTRL, MPT, RWKV), an SSM
with no attention (Mamba), hybrids whose attention is in some blocks only (Jamba, RecurrentGemma), MoE,
the Gemma 2 override, encoders. Each site's module path is written here by hand, and the reference is the
sweep's hand-written forward hook (or pre-hook) on it: × 0.5, the first head's channels × 0.5, or + 8 on
expert 1's logit. A site a family lacks must be refused with a diagnostic.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import garage
from garage.plan import archs, discover

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from sweep import reference_hooks, tiny  # noqa: E402  (the sweep's builder and hooks: no garage code)

SITES = {"h": "h.1", "in": "h.1.in", "attn": "h.1.attn", "mlp": "h.1.mlp", "embed": "embed", "final": "final",
         "heads": "h.1.attn.heads{0}", "hidden": "h.1.mlp.hidden", "router": "h.1.router"}


def _paths(block: str, blocks: str, **parts: str | None) -> dict[str, str | None]:
    """Block 1's paths: `parts` relative to block 1, except `final` (whole); None: the family has none."""
    rel = {k: (f"{block}.{v}" if v is not None else None) for k, v in parts.items() if k != "final"}
    return {"h": block, "in": block, "embed": f"{blocks}.0", "final": parts.get("final"), **rel}


def _family(blocks: str, attn: str | None, mlp: str | None, final: str | None, heads: str | None,
            hidden: str | None, router: str | None = None) -> dict[str, str | None]:
    return _paths(f"{blocks}.1", blocks, attn=attn, mlp=mlp, final=final, heads=heads, hidden=hidden, router=router)


# family → (head class, block 1's site paths), read off each family's modelling code.
FAMILIES: dict[str, tuple[str, dict[str, str | None]]] = {
    "gpt2": ("causal", _family("transformer.h", "attn", "mlp", "transformer.ln_f", "attn.c_proj", "mlp.c_proj")),
    "opt": ("causal", _family("model.decoder.layers", "self_attn", "fc2", "model.decoder.final_layer_norm",
                              "self_attn.out_proj", "fc2")),
    "bart": ("causal", _family("model.decoder.layers", "self_attn", "fc2", None, "self_attn.out_proj", "fc2")),
    "mbart": ("causal", _family("model.decoder.layers", "self_attn", "fc2", "model.decoder.layer_norm",
                                "self_attn.out_proj", "fc2")),
    "mpt": ("causal", _family("transformer.blocks", "attn", "ffn", "transformer.norm_f", "attn.out_proj",
                              "ffn.down_proj")),
    "ctrl": ("causal", _family("transformer.h", "multi_head_attention", "ffn", "transformer.layernorm",
                               "multi_head_attention.dense", "ffn.2")),
    "openai-gpt": ("causal", _family("transformer.h", "attn", "mlp", None, "attn.c_proj", "mlp.c_proj")),
    "rwkv": ("causal", _family("rwkv.blocks", "attention", "feed_forward", "rwkv.ln_out", None, "feed_forward.value")),
    "mamba": ("causal", _family("backbone.layers", None, None, "backbone.norm_f", None, None)),
    # Jamba with attention and experts in blocks 1 and 3; RecurrentGemma with attention in block 2 only.
    "jamba": ("causal", _family("model.layers", "self_attn", "feed_forward", "model.final_layernorm", "self_attn.o_proj",
                                None, "feed_forward.router")),
    "recurrent_gemma": ("causal", _family("model.layers", None, "mlp_block", "model.final_norm", None,
                                          "mlp_block.down_proj")),
    "mixtral": ("causal", _family("model.layers", "self_attn", "mlp", "model.norm", "self_attn.o_proj", None, "mlp.gate")),
    "gemma2": ("causal", _family("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "model.norm",
                                 "self_attn.o_proj", "mlp.down_proj")),
    "roberta": ("masked", _family("roberta.encoder.layer", "attention.output.dense", "output.dense", None,
                                  "attention.output.dense", "output.dense")),
    "mpnet": ("masked", _family("mpnet.encoder.layer", "attention.attn.o", "output.dense", None, "attention.attn.o",
                                "output.dense")),
}


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def under(model: torch.nn.Module, kind: str, path: str, run, head_size: int = 0) -> Any:
    """`run()` with the sweep's reference hook for `kind` at `path` (× 0.5 on the module's output or input,
    the first head's channels × 0.5, or + 8 on expert 1's logit), removed after."""
    handles = reference_hooks(model, kind, path, head_size)
    try:
        with torch.no_grad():
            return run()
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_site_kind_equals_a_hand_written_hook_or_is_refused_and_generation_equals_it(family, batch):
    head, paths = FAMILIES[family]
    model = tiny(family, head)
    config = model.config.get_text_config()
    head_size = 64 // config.num_attention_heads if getattr(config, "num_attention_heads", 0) else 0
    with torch.no_grad():
        plain = logits_of(model(**batch))
    for kind, site in SITES.items():
        path = paths.get(kind)
        op = "bias {1} * 8" if kind == "router" else "scale 0.5"
        if path is None:
            with pytest.raises(garage.ResolveError):
                garage.compile(model, f"at {site} {op}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", garage.GarageWarning)  # the static-shape and hook fallbacks'
            inj = garage.compile(model, f"at {site} {op}")
            with torch.no_grad():
                got = logits_of(inj(**batch))
            tokens = inj.generate(batch["input_ids"], max_new_tokens=5, pad_token_id=0) if kind == "h" and \
                head == "causal" else None
        want = under(model, kind, path, lambda: logits_of(model(**batch)), head_size)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item()), (family, kind, path)
        assert not torch.equal(got, plain), (family, kind)
        if tokens is not None:  # greedy generation equals model.generate under the same hook
            ids = batch["input_ids"]
            assert torch.equal(tokens, under(model, kind, path, lambda: model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0))), family


# ------------------------------------------------------------------ what discovery says, and the overrides
def test_a_missing_sublayer_is_a_diagnostic_that_says_what_is_there():
    jamba = tiny("jamba", "causal")  # attention in blocks 1 and 3
    with pytest.raises(garage.ResolveError) as err:
        garage.compile(jamba, "at h.0.attn scale 0.5")
    (diagnostic,) = err.value.diagnostics
    assert diagnostic.message == "block 0 of this model (jamba) has no attention"
    assert diagnostic.hint == "its blocks with attention are 1, 3"
    mamba = tiny("mamba", "causal")
    (diagnostic,) = garage.check(mamba, "at h.1.mlp scale 0.5").errors
    assert "no MLP sublayer that garage finds: its block 1 holds norm (MambaRMSNorm), mixer (MambaMixer)" in \
        diagnostic.message


@pytest.mark.parametrize("family", sorted(archs.ARCHS))
def test_each_override_is_still_needed(family):
    """An override row exists because discovery would place a site elsewhere; if discovery learns the family,
    the row should go. (Its sites are checked against hooks in test_reference and above.)"""
    from zoo import tiny_model

    model = tiny_model("gemma3" if family == "gemma3_text" else family)
    modules = dict(model.named_modules())
    info = garage.ModelInfo.from_model(model)
    found = discover._discover(modules, info.blocks, info.num_layers, info.hidden_size)
    row = archs.ARCHS[family]
    assert (found.attn, found.mlp) != (row.attn, row.mlp)
    assert info.from_table and (info.attn, info.mlp) == (row.attn, row.mlp)


# ------------------------------------------------------------------ models that cannot be traced
def test_a_model_whose_code_fixes_its_length_is_traced_per_shape_and_generates_by_hooks(batch):
    mamba = tiny("mamba", "causal")  # its forward specialises the sequence length: no dynamic export
    with pytest.warns(garage.GarageWarning, match=r"traces its scoring graph again for each input shape"):
        inj = garage.compile(mamba, "at h.1 scale 0.5")
    assert [w.rule for w in inj.warnings] == ["static-shapes"]
    assert "garage_op_0" in inj.explain()  # a real graph node, not a hook
    for length in (7, 9):
        ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            got = inj(input_ids=ids).logits
        assert torch.equal(got, under(mamba, "h", "backbone.layers.1", lambda: mamba(input_ids=ids).logits))
    assert [w.rule for w in inj.warnings] == ["static-shapes"]  # said once, whatever the number of shapes
    with pytest.warns(garage.GarageWarning, match=r"generation graph.*\[hook-fallback\]"):
        inj.generate(batch["input_ids"], max_new_tokens=2)  # its SSM cache is not one the step graph holds
    assert list(inj.fallbacks) == ["generation"] and "generation: by forward hooks" in inj.explain()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each said once
        inj.generate(batch["input_ids"], max_new_tokens=2)
        inj(input_ids=batch["input_ids"][:, :5])
    report = garage.check(mamba, "at h.1 scale 0.5")
    assert report.ok and [w.rule for w in report.warnings] == ["static-shapes"]
    assert not mamba._forward_hooks and not mamba._forward_pre_hooks  # each call took its hooks away


def test_a_cache_the_step_graph_cannot_hold_generates_by_hooks(batch):
    gpt = tiny("openai-gpt", "causal")  # no KV cache at all
    inj = garage.compile(gpt, "at h.1 scale 0.5")
    assert not inj.warnings  # scoring has its graph
    with pytest.warns(garage.GarageWarning, match="generation graph"):
        inj.generate(batch["input_ids"], max_new_tokens=3)
    assert list(inj.fallbacks) == ["generation"]
    assert any(n.name.startswith("garage_op") for n in inj.graph_module.graph.nodes)  # scoring keeps its graph


# ------------------------------------------------------------------ big models: accelerate's device maps
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = tiny("llama", "causal")
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return model, folder


def _device_map(placements: list[str]) -> dict[str, str]:
    layers = {f"model.layers.{i}": where for i, where in enumerate(placements)}
    return {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_layers_offloaded_to_disk_run_by_hooks_with_the_same_numbers(saved_llama, batch):
    from transformers import AutoModelForCausalLM

    model, folder = saved_llama
    offloaded = AutoModelForCausalLM.from_pretrained(folder, device_map=_device_map(["cpu", "disk", "disk", "cpu"]),
                                                     offload_folder=str(folder / "offload")).eval()
    assert any(p.is_meta for p in offloaded.parameters())  # the disk layers really are offloaded
    bind = {"v": torch.randn(64, generator=torch.Generator().manual_seed(3))}
    with pytest.warns(garage.GarageWarning, match="offloads some of its layers to disk"):
        inj = garage.compile(offloaded, "at h.2 scale 0.5; at h.1.mlp add v", bind=bind)
    with torch.no_grad():
        got = inj(**batch).logits
    handles = reference_hooks(model, "h", "model.layers.2", 0) + [model.get_submodule("model.layers.1.mlp").register_forward_hook(
        lambda _m, _a, out: out + bind["v"])]
    try:
        with torch.no_grad():
            want = model(**batch).logits
            tokens = model.generate(batch["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(inj.generate(batch["input_ids"], max_new_tokens=4, pad_token_id=0), tokens)
    assert "(hook)" in inj.explain()


def test_a_map_that_spreads_layers_over_cpu_entries_keeps_the_graph(saved_llama, batch):
    from transformers import AutoModelForCausalLM

    model, folder = saved_llama
    spread = AutoModelForCausalLM.from_pretrained(folder, device_map=_device_map(["cpu"] * 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", garage.GarageWarning)
        inj = garage.compile(spread, "at h.2 scale 0.5")
    with torch.no_grad():
        got = inj(**batch).logits
    want = under(model, "h", "model.layers.2", lambda: model(**batch).logits)
    assert torch.allclose(got, want, atol=1e-5) and not inj.fallbacks
    assert any(n.name.startswith("garage_op") for n in inj.graph_module.graph.nodes)


# ------------------------------------------------------------------ the generation config's processors
def test_generate_follows_the_generation_configs_processors(batch):
    """forced EOS (BART's family), n-gram blocking and repetition penalty (chat models): the tokens
    `model.generate` picks with the same config."""
    model = tiny("llama", "causal")
    config = model.generation_config
    config.no_repeat_ngram_size, config.repetition_penalty, config.forced_eos_token_id = 2, 1.3, 2
    ids = batch["input_ids"]
    tokens = garage.compile(model, "at h.1 scale 0.5").generate(ids, max_new_tokens=6, pad_token_id=0)
    want = under(model, "h", "model.layers.1", lambda: model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert torch.equal(tokens, want)
    assert (tokens[:, -1] == 2).all()  # forced EOS at the last position
    config.no_repeat_ngram_size, config.repetition_penalty, config.forced_eos_token_id = 0, 1.0, None
    plain = garage.compile(model, "at h.1 scale 0.5").generate(ids, max_new_tokens=6, pad_token_id=0)
    assert not torch.equal(plain, tokens)
