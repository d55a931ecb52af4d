"""The resolver makes every written site concrete for one model, and reports what does not fit."""

import pytest
from zoo import ARCH_NAMES, tiny_model

import garage
from garage.plan.archs import ARCHS


def resolved(model, text: str) -> list[tuple[str, int | None, str]]:
    return [(s.site.kind, s.site.layer, s.site.module_path) for s in garage.resolve(garage.parse(text), model)]


def layers(model, site: str) -> list[int]:
    return [layer for _, layer, _ in resolved(model, f"at {site} zero")]


@pytest.mark.parametrize(
    "site, expected",
    [
        ("N-4", [8]),
        ("h.N-1", [11]),
        ("-1", [11]),
        ("h.-12", [0]),
        ("h.2..5", [2, 3, 4, 5]),
        ("h.{1, N-1}", [1, 11]),
        ("h.{3, 1..2, 3}", [3, 1, 2]),
        ("h.*", list(range(12))),
        ("50%", [6]),
        ("0%", [0]),
        ("h.6", [6]),
        ("layers.6", [6]),
        ("blocks.6.out", [6]),
        ("transformer.h.6", [6]),
        ("h.6", [6]),
    ],
)
def test_layer_indices_on_12_layers(gpt2_12, site, expected):
    assert layers(gpt2_12, site) == expected


def test_percent_on_32_layers_is_n_minus_4(gpt2_32):
    assert layers(gpt2_32, "87.5%") == [28] == layers(gpt2_32, "N-4")
    assert layers(gpt2_32, "99.9%") == [31]


def test_every_site_form_on_gpt2(gpt2_12):
    text = """
    at h.6 zero; at h.6.in zero; at h.6.attn zero; at h.6.mlp zero
    at embed zero; at final zero
    at "transformer.h.6.mlp" zero; at "transformer.h.3" zero; at "transformer.ln_f" zero
    at transformer.h.2.mlp.c_fc zero; at "transformer.h.2.attn.c_attn" zero; at transformer.wte zero
    """
    assert resolved(gpt2_12, text) == [
        ("out", 6, "transformer.h.6"),
        ("in", 6, "transformer.h.6"),
        ("attn", 6, "transformer.h.6.attn"),
        ("mlp", 6, "transformer.h.6.mlp"),
        ("in", 0, "transformer.h.0"),
        ("final", None, "transformer.ln_f"),
        ("mlp", 6, "transformer.h.6.mlp"),
        ("out", 3, "transformer.h.3"),
        ("final", None, "transformer.ln_f"),
        ("module", 2, "transformer.h.2.mlp.c_fc"),
        ("module", 2, "transformer.h.2.attn.c_attn"),
        ("module", None, "transformer.wte"),
    ]


def test_labels_are_canonical(gpt2_12):
    plan = garage.resolve(garage.parse('at N-4.mlp[last] zero; at embed zero; at "transformer.wte" zero'), gpt2_12)
    assert [s.site.label for s in plan] == ["h.8.mlp[last]", "embed", '"transformer.wte"']
    assert plan.steps[0].site.positions == garage.parse("at h.0[last] zero").statements[0].site.positions


def test_plan_keeps_statement_numbers_and_spans(gpt2_12):
    plan = garage.resolve(garage.parse("expect layers 12\nat h.1..2 scale 2; at h.3 zero"), gpt2_12)
    assert [(s.statement, s.site.layer, s.span.line, s.span.column) for s in plan] == [
        (1, 1, 2, 1), (1, 2, 2, 1), (2, 3, 2, 20)
    ]
    assert len(plan) == 3 and plan.info.num_layers == 12


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_every_architecture_resolves_every_component(name):
    model = tiny_model(name)
    info = garage.ModelInfo.from_model(model)
    assert info.num_layers == 4 and info.hidden_size == 64
    modules = dict(model.named_modules())
    kinds = ["in", "out", "attn", "mlp"] + ([] if name == "bert" else ["final"])
    text = "; ".join(f"at h.N-1.{k} zero" if k != "final" else "at final zero" for k in kinds)
    for kind, layer, path in resolved(model, text):
        assert path in modules, (kind, path)
        assert layer == (None if kind == "final" else 3)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "opt"])
def test_base_models_without_heads_resolve_too(name):
    model = tiny_model(name, head=False)
    assert resolved(model, "at h.1.mlp zero")[0][1] == 1


def test_own_container_paths_work_per_family():
    llama = tiny_model("llama")
    assert layers(llama, "model.layers.2") == [2] == layers(llama, "layers.2")
    assert resolved(llama, "at model.layers.2.self_attn zero") == [("attn", 2, "model.layers.2.self_attn")]
    opt = tiny_model("opt")
    assert layers(opt, "model.decoder.layers.1") == [1] == layers(opt, "decoder.layers.1")


def test_unknown_model_type_falls_back_to_discovery():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    info = garage.ModelInfo.from_model(model)
    assert "mystery" not in ARCHS and not info.from_table
    assert (info.blocks, info.attn, info.mlp, info.final_norm) == ("model.layers", "self_attn", "mlp", "model.norm")


# ------------------------------------------------------------------ errors
def resolve_errors(model, text: str) -> list[garage.Diagnostic]:
    with pytest.raises(garage.ResolveError) as err:
        garage.resolve(garage.parse(text, filename="r.garage"), model)
    return err.value.diagnostics


@pytest.mark.parametrize(
    "text, pos, message, hint",
    [
        ("at h.40 zero", (1, 6, 8), "layer 40 is out of range: this model has 12 layers (0..11)", "0..11"),
        ("at N+1 zero", (1, 4, 7), "layer N+1 (= 13) is out of range: this model has 12 layers (0..11)", None),
        ("at h.-13 zero", (1, 6, 9), "layer -13 (= -1) is out of range", None),
        ("at 100% zero", (1, 4, 8), "layer 100% (= 12) is out of range", None),
        ("at h.{1, 20} zero", (1, 10, 12), "layer 20 is out of range", None),
        ("at h.5..2 zero", (1, 6, 10), "empty layer range: 5 > 2", "2..5"),
        ("at h.3.atn zero", (1, 4, 11), "no module 'atn' in block 3", "did you mean 'attn'?"),
        ('at "transformer.h.3.mlpp" zero', (1, 4, 26), "no module 'transformer.h.3.mlpp'", "'transformer.h.3.mlp'"),
        ("at transformr.ln_f zero", (1, 4, 19), "no module 'transformr.ln_f'", "'transformer.ln_f'"),
        ("at model.layers.3 zero", (1, 4, 18), "'model.layers' is not this model's block list (transformer.h)", None),
        ("expect layers 32", (1, 1, 17), "expected 32 layers, but this model has 12", None),
        ("expect hidden 768", (1, 1, 18), "expected hidden size 768, but this model's is 32", None),
        ('expect model "llama"', (1, 1, 21), 'expected model type "llama", but this model is "gpt2"', None),
    ],
)
def test_one_resolve_error(gpt2_12, text, pos, message, hint):
    [d] = resolve_errors(gpt2_12, text)
    assert (d.line, d.column, d.end_column) == pos and d.filename == "r.garage"
    assert message in d.message
    if hint:
        assert hint in d.hint


def test_missing_components_are_named():
    [d] = resolve_errors(tiny_model("bert"), "at final zero")
    assert "this model (bert) has no final norm" in d.message and "h.-1" in d.hint


def test_all_resolve_errors_are_reported_together(gpt2_12):
    diags = resolve_errors(gpt2_12, "expect layers 3\nat h.1 zero\nat h.99 zero; at h.1.mlpx zero\nat final zero")
    assert [(d.line, d.column) for d in diags] == [(1, 1), (3, 6), (3, 18)]
