"""The seed library's API on garage: its guide's code runs after `model_garage` → `garage`, and runs better."""

from __future__ import annotations

import hashlib
import textwrap

import pytest
import torch
from torch import nn

import garage
from garage.core.loader import quick_load
from garage.inject.debate import SelfDebate
from garage.inject.layer import LayerInjector, quick_inject
from garage.models import load_model_and_tokenizer as load


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """A tiny GPT-2 (12 layers, so the guide's `transformer.h.6` exists) with a tokenizer, saved to disk."""
    folder = tmp_path_factory.mktemp("gpt2")
    model, tokenizer = load("tiny:gpt2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def state(model: nn.Module) -> tuple:
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode() + t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return digest.hexdigest(), hooks, tuple(m.training for m in model.modules())


# The guide's snippets, verbatim but for the import prefix and the model name.
GUIDE = {
    "scaling": """
        import torch
        from garage.core.loader import quick_load
        from garage.inject.layer import LayerInjector
        model, tokenizer, info = quick_load(MODEL)
        input_ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids
        # Scale activations at layer 6 by 90%
        with LayerInjector(model) as injector:
            injector.inject_scaling("transformer.h.6", scale=0.9)
            with torch.no_grad():
                output = model.generate(input_ids, max_new_tokens=20)
            print(tokenizer.decode(output[0]))
    """,
    "custom": """
        import torch
        import torch.nn as nn
        from garage.core.loader import quick_load
        from garage.inject.layer import LayerInjector
        model, tokenizer, info = quick_load(MODEL)
        input_ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids
        class ActivationNoise(nn.Module):
            def __init__(self, std=0.01):
                super().__init__()
                self.std = std
            def forward(self, x):
                if self.training:
                    return x + torch.randn_like(x) * self.std
                return x
        with LayerInjector(model) as injector:
            injector.inject_custom_layer("transformer.h.6", ActivationNoise(std=0.02))
            output = model(input_ids)
    """,
    "debate": """
        from garage.core.loader import quick_load
        from garage.inject.debate import SelfDebate
        model, tokenizer, info = quick_load(MODEL)
        input_ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids
        # Use gated injection for best results (+8.9% over identity)
        with SelfDebate(model, layer_idx=6, reconciliation_method="gated"):
            output = model.generate(input_ids, max_new_tokens=50)
    """,
    "multiple": """
        import torch.nn as nn
        from garage.core.loader import quick_load
        from garage.inject.layer import LayerInjector
        model, tokenizer, info = quick_load(MODEL)
        input_ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids
        my_adapter = nn.Linear(info["hidden_size"], info["hidden_size"])
        with LayerInjector(model) as injector:
            injector.inject_scaling("transformer.h.4", scale=1.1)
            injector.inject_scaling("transformer.h.8", scale=0.85)
            injector.inject_custom_layer("transformer.h.6", my_adapter)
            output = model(input_ids)
    """,
}


def scaled(factor: float):
    """A reference hook: the block's output (a tensor, or the first item of a tuple) times `factor`."""
    def hook(_module, _args, out):
        return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor
    return hook


def mapped(module: nn.Module):
    def hook(_module, _args, out):
        return (module(out[0]), *out[1:]) if isinstance(out, tuple) else module(out)
    return hook


def expected_output(snippet: str, namespace: dict):
    """What the snippet's `output` must be, computed with hooks written here on GPT-2's own module paths."""
    model, ids = namespace["model"], namespace["input_ids"]
    blocks = model.transformer.h
    hooks = {
        "scaling": [(blocks[6], scaled(0.9))],
        "custom": [],  # ActivationNoise adds noise in training mode only: eval output is the plain model's
        "multiple": [(blocks[4], scaled(1.1)), (blocks[8], scaled(0.85)), (blocks[6], mapped(namespace.get("my_adapter")))],
    }[snippet]
    handles = [block.register_forward_hook(hook) for block, hook in hooks]
    try:
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=20) if snippet == "scaling" else model(ids)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("snippet", sorted(GUIDE))
def test_the_guide_runs_on_garage(saved_gpt2, snippet):
    namespace = {"MODEL": saved_gpt2}
    exec(textwrap.dedent(GUIDE[snippet]), namespace)
    model = namespace["model"]
    assert state(model)[1] == 0  # every hook is gone after the with block
    output, ids = namespace["output"], namespace["input_ids"]
    if snippet == "debate":  # its chamber's views are random projections: check what the guide promises
        assert output.shape == (1, ids.shape[1] + 50) and torch.equal(output[:, : ids.shape[1]], ids)
        return
    want = expected_output(snippet, namespace)
    if snippet == "scaling":
        assert torch.equal(output, want)
    else:
        assert torch.allclose(output.logits, want.logits, atol=1e-5)


def test_guide_scaling_under_generate_is_the_compiled_spec(saved_gpt2):
    model, tokenizer, _ = quick_load(saved_gpt2)
    ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids
    with LayerInjector(model) as injector:
        injector.inject_scaling("transformer.h.6", scale=0.5)
        hooked = model.generate(ids, max_new_tokens=20)
        spec, compiled = injector.to_spec(), injector.compile()
    assert spec == "at h.6 scale 0.5\n"
    assert torch.equal(compiled.generate(ids, max_new_tokens=20), hooked)
    assert not torch.equal(model.generate(ids, max_new_tokens=20), hooked)


def test_quick_load_info_device_dtype_and_eval(saved_gpt2):
    model, tokenizer, info = quick_load(saved_gpt2, device="cpu", dtype=torch.bfloat16)
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16
    assert set(info) >= {"model_id", "architecture", "hidden_size", "num_layers", "num_heads", "vocab_size",
                         "max_position", "device", "dtype", "total_params", "trainable_params"}
    assert (info["num_layers"], info["hidden_size"], info["dtype"], info["device"]) == (12, 128, "bfloat16", "cpu")
    assert info["architecture"] == "GPT2LMHeadModel" and info["total_params"] == info["trainable_params"] > 0


def test_identical_names_never_leak_hooks():
    model, _ = load("tiny:gpt2")
    before = state(model)
    injector = LayerInjector(model)
    first = injector.inject_scaling("transformer.h.6", scale=0.9, name="damp")
    second = injector.inject_scaling("transformer.h.6", scale=0.9, name="damp")
    assert first != second and len(injector.list_injections()) == 2
    injector.remove_all()
    assert state(model) == before


def test_an_exception_in_the_block_restores_the_model():
    model, tokenizer = load("tiny:gpt2")
    before = state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with LayerInjector(model) as injector:
            injector.inject_scaling("h.6", 0.5)
            injector.inject_custom_layer("transformer.h.2.mlp", nn.Linear(128, 128))
            injector.inject_noise(3, std=1.0)
            model(tokenizer("abc", return_tensors="pt").input_ids)
            raise RuntimeError("boom")
    assert state(model) == before


def test_custom_modules_follow_mode_device_and_dtype():
    model, tokenizer = load("tiny:gpt2")
    model.to(torch.bfloat16)
    probe = nn.Dropout(0.5)
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    with LayerInjector(model) as injector:
        adapter = nn.Linear(128, 128)
        injector.inject_custom_layer("h.3", adapter)
        injector.inject_custom_layer("h.4", probe)
        assert adapter.weight.dtype == torch.bfloat16
        a, b = model(ids).logits, model(ids).logits
        assert torch.equal(a, b) and not probe.training  # eval model: dropout off
        model.train()
        model(ids)
        assert probe.training
        model.eval()


def test_noise_is_on_always_as_in_the_seed_unless_limited_to_training():
    model, tokenizer = load("tiny:gpt2")
    ids = tokenizer("hello", return_tensors="pt").input_ids
    plain = model(ids).logits
    with LayerInjector(model) as injector:
        injector.inject_noise("h.2", noise_scale=1.0, always=False)
        assert torch.equal(model(ids).logits, plain)
        injector.inject_noise("h.2", 1.0)  # the seed's default: always, noise_scale 0.01
        assert not torch.equal(model(ids).logits, plain)
        assert injector.to_spec() == "at h.2 noise 1.0\nat h.2 noise 1.0 always\n"


def test_the_seeds_signatures_defaults_and_plain_callables(recwarn):
    """inject takes a lambda, inject_additive a float, inject_scaling defaults to 0.9, list_injections
    gives names, quick_inject is one call; the reference hooks below carry their own formulas and paths."""
    model, tokenizer = load("tiny:gpt2")
    ids = tokenizer("hello there", return_tensors="pt").input_ids

    def expected(formula, path):
        handle = dict(model.named_modules())[path].register_forward_hook(
            lambda _m, _a, o: (formula(o[0]), *o[1:]) if isinstance(o, tuple) else formula(o))
        try:
            return model(ids).logits
        finally:
            handle.remove()

    torch.manual_seed(5)
    with LayerInjector(model) as injector:
        injector.inject_noise("transformer.h.3", noise_scale=0.5)  # always on, from torch's generator
        torch.manual_seed(5)
        noisy = model(ids).logits
    torch.manual_seed(5)
    assert torch.equal(noisy, expected(lambda h: h + 0.5 * torch.randn_like(h), "transformer.h.3"))
    with LayerInjector(model) as injector:
        injector.inject_identity("transformer.h.3")
        kept = injector.inject_scaling("transformer.h.3", 2.0)
        injector.remove(kept)
        assert torch.equal(model(ids).logits, expected(lambda h: h, "transformer.h.3"))
    cases = [
        (lambda inj: inj.inject("transformer.h.3", lambda h: h * 0.5 + 1.0), lambda h: h * 0.5 + 1.0),
        (lambda inj: inj.inject_additive("transformer.h.3", 0.25), lambda h: h + 0.25),
        (lambda inj: inj.inject_scaling("transformer.h.3"), lambda h: h * 0.9),
    ]
    for make, formula in cases:
        with LayerInjector(model) as injector:
            make(injector)
            got = model(ids).logits
        assert torch.allclose(got, expected(formula, "transformer.h.3"), atol=1e-5)
    with LayerInjector(model) as injector:
        first = injector.inject("h.3", torch.tanh)
        second = injector.inject_scaling("h.4", name="damp")
        assert injector.list_injections() == [first, "damp"] and second == "damp"
        assert injector.to_spec() == "at h.4 scale 0.9\n"
    (warning,) = [w for w in recwarn if issubclass(w.category, garage.GarageWarning)]
    assert f"injection {first!r} (tanh) is a plain callable: it has no .garage form" in str(warning.message)
    with quick_inject(model, 3, lambda h: h * 0.5 + 1.0) as injector:
        got = model(ids).logits
        assert len(injector.list_injections()) == 1
    assert torch.allclose(got, expected(lambda h: h * 0.5 + 1.0, "transformer.h.3"), atol=1e-5)
    with pytest.raises(TypeError, match="an nn.Module or a callable"):
        LayerInjector(model).inject("h.3", 0.5)


def test_to_spec_and_compile_cover_every_method():
    model, tokenizer = load("tiny:gpt2")
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    torch.manual_seed(0)
    vector, adapter = torch.randn(128), nn.Sequential(nn.Linear(128, 128), nn.Tanh())
    with LayerInjector(model) as injector:
        injector.inject_identity("h.1")
        injector.inject_scaling("transformer.h.2", 1.5)
        injector.inject_additive("h.3.mlp", vector, scale=0.5, name="steer")
        injector.inject("N-4", adapter, name="adapter")
        injector.inject_noise("h.5", 0.3, always=False)
        hooked = model(ids).logits
        assert injector.to_spec() == (
            "at h.1 module identity\nat h.2 scale 1.5\nat h.3.mlp add steer * 0.5\nat h.8 module adapter\n"
            "at h.5 noise 0.3\n"
        )
        compiled = injector.compile()
    assert torch.allclose(compiled(input_ids=ids).logits, hooked, atol=1e-5)


def test_bad_layers_are_clear_errors():
    model, _ = load("tiny:gpt2")
    injector = LayerInjector(model)
    with pytest.raises(ValueError, match="layer 40 is out of range"):
        injector.inject_scaling("transformer.h.40", 0.5)
    with pytest.raises(ValueError, match="names 12 sites"):
        injector.inject_scaling("h.*", 0.5)
    with pytest.raises(ValueError, match="no module 'mlpp' in block 1 \\(did you mean 'mlp'"):
        injector.inject_scaling("transformer.h.1.mlpp", 0.5)


# ------------------------------------------------------------------ SelfDebate
def test_self_debate_uses_the_architecture_table_and_projection_is_deterministic():
    model, tokenizer = load("tiny:llama")
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    plain = model(ids).logits
    debate = SelfDebate(model, reconciliation_method="gated", divergence_method="projection")
    assert debate.layer_idx == 4 and debate.site.module_path == "model.layers.4"  # N-4 on 8 layers
    with debate:
        a, b = model(ids).logits, model(ids).logits
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert torch.equal(model(ids).logits, plain) and state(model)[1] == 0


def test_the_guides_example_changes_the_output_in_eval_by_seeded_dropout_views():
    """The seed's example (dropout views, gated) did nothing under eval. Here the two views are dropout
    masks drawn from the debate's own generator: the reference below draws them from its own generator
    with the same seed, and reconciles them as an untrained gate does (σ(0) = ½ each)."""
    model, tokenizer = load("tiny:gpt2")
    ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids
    plain = model(ids).logits
    with SelfDebate(model, layer_idx=6, reconciliation_method="gated") as debate:
        got = model(ids).logits
    generator = torch.Generator().manual_seed(0)

    def views(_m, _a, o):
        h = o[0] if isinstance(o, tuple) else o
        a = h * (torch.rand(h.shape, generator=generator) < 0.9).to(h.dtype) / 0.9
        b = h * (torch.rand(h.shape, generator=generator) < 0.9).to(h.dtype) / 0.9
        return ((a + b) / 2, *o[1:]) if isinstance(o, tuple) else (a + b) / 2

    handle = model.transformer.h[6].register_forward_hook(views)
    want = model(ids).logits
    handle.remove()
    assert torch.allclose(got, want, atol=1e-5)
    shift = ((got - plain).norm() / plain.norm()).item()
    assert 0.1 < shift < 0.5, shift  # measured: the logits move by 31% of their norm (tiny:gpt2, seed 0)
    (record,) = debate.get_debate_info()
    assert 0.8 < record["cosine_similarity"] < 1 and record["l2_difference"] > 0
    with SelfDebate(model, layer_idx=6, reconciliation_method="gated", seed=0):
        assert torch.equal(model(ids).logits, got)  # the same seed repeats exactly
    with SelfDebate(model, layer_idx=6, reconciliation_method="gated", seed=1):
        assert not torch.equal(model(ids).logits, got)


def test_self_debate_takes_the_seeds_parameters():
    model, tokenizer = load("tiny:gpt2")
    ids = tokenizer("hi", return_tensors="pt").input_ids
    plain = model(ids).logits
    with SelfDebate(model, layer_idx=3, divergence_method="perturbation", divergence_strength=0.5,
                    layer_name_template="transformer.h.{}") as debate:
        assert not torch.equal(model(ids).logits, plain)
    assert debate.site.module_path == "transformer.h.3" and debate.chamber.views == "noise"
    with pytest.raises(ValueError, match="layer_name_template 'decoder.{}' gives 'decoder.3'"):
        SelfDebate(model, layer_idx=3, layer_name_template="decoder.{}")
    seed_form = SelfDebate(model, layer_idx=5, layer_name_template="transformer.h.{idx}")  # the seed formats idx=
    assert seed_form.site.module_path == "transformer.h.5"
    with pytest.raises(ValueError, match=r"write the block index as \{idx\} or \{\}"):
        SelfDebate(model, layer_idx=3, layer_name_template="transformer.h.{layer}")
    with pytest.raises(ValueError, match="dropout, perturbation or projection"):
        SelfDebate(model, divergence_method="shuffle")


def test_self_debate_info_is_bounded_and_gated_works_in_half_precision():
    model, tokenizer = load("tiny:gpt2")
    model.to(torch.bfloat16)
    ids = tokenizer("hi", return_tensors="pt").input_ids
    with SelfDebate(model, layer_idx=6, reconciliation_method="gated", divergence_method="noise") as debate:
        for _ in range(100):
            model(ids)
        info = debate.get_debate_info()
    assert len(info) == 64 and all(r["relative_shift"] > 0 and r["l2_difference"] > 0 for r in info)
    assert debate.settings()["layer_path"] == "transformer.h.6" and not debate.enabled
    with pytest.raises(ValueError, match="out of range"):
        SelfDebate(model, layer_idx=12)
