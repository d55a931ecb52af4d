"""Independent references: what each op computes, checked against forward hooks written here.

Nothing below uses garage's ops, plan, resolver or hook backend. Each op's formula is written inline,
and each architecture's module paths come from the hand-written table below, so a wrong formula, a
wrong layer or a wrong position mask in garage fails these tests even where both of garage's backends
agree with each other. Inputs are random padded batches, over several seeds.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from zoo import HIDDEN, INTERMEDIATE, tiny_model

import garage

# Per architecture, written by hand from each family's modeling code: the block list, and inside a block
# the module whose output is attention (resp. the MLP) before its residual add.
PATHS: dict[str, tuple[str, str, str]] = {
    "gpt2": ("transformer.h", "attn", "mlp"),
    "llama": ("model.layers", "self_attn", "mlp"),
    "qwen2": ("model.layers", "self_attn", "mlp"),
    "mistral": ("model.layers", "self_attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
    "phi3": ("model.layers", "self_attn", "mlp"),
    "gemma2": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "opt": ("model.decoder.layers", "self_attn", "fc2"),
    "bert": ("bert.encoder.layer", "attention.output.dense", "output.dense"),
    "mixtral": ("model.layers", "self_attn", "mlp"),
    "qwen2_moe": ("model.layers", "self_attn", "mlp"),
    "qwen3_moe": ("model.layers", "self_attn", "mlp"),
}
SEEDS = (0, 1)
Formula = Callable[[torch.Tensor], torch.Tensor]


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + seed)
    return {"v": torch.randn(HIDDEN, generator=g), "d": torch.randn(HIDDEN, generator=g),
            "b": torch.randn(HIDDEN, generator=g), "wide": torch.randn(3 * HIDDEN, generator=g)}


def ablated(h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    unit = d / d.norm()
    return h - (h @ unit)[..., None] * unit


def topk_blade(wide: torch.Tensor) -> torch.Tensor:
    keep = wide.abs().topk(HIDDEN).indices.sort().values  # the largest magnitudes, in their own order
    return wide[keep]


# op text → the formula it must compute, given the bound tensors t and the injected model (whose random
# parameters, such as a debate's projection, are data the formula reads, not garage code it runs).
OPS: dict[str, Callable[[dict[str, torch.Tensor], garage.InjectedModel], Formula]] = {
    "scale -1.7": lambda t, inj: lambda h: -1.7 * h,
    "add v * 0.5": lambda t, inj: lambda h: h + 0.5 * t["v"],
    "add v": lambda t, inj: lambda h: h + t["v"],
    "ablate d": lambda t, inj: lambda h: ablated(h, t["d"]),
    "zero": lambda t, inj: lambda h: torch.zeros_like(h),
    "clamp -0.05 0.02": lambda t, inj: lambda h: h.clamp(-0.05, 0.02),
    "noise 0.3": lambda t, inj: lambda h: h,  # eval mode: no noise
    "noise 0.3 always": lambda t, inj: lambda h: h + 0.3 * torch.randn_like(h),  # the same seed in both runs
    "blade identity from b alpha 0.7": lambda t, inj: lambda h: h + 0.7 * t["b"],
    # the gate starts at σ(−2) and α defaults to 0.1, as in the Blades research
    "blade gated from b alpha 0.3": lambda t, inj: lambda h: h + 0.3 * torch.sigmoid(torch.tensor(-2.0)) * t["b"],
    "blade gated from wide project topk":
        lambda t, inj: lambda h: h + 0.1 * torch.sigmoid(torch.tensor(-2.0)) * topk_blade(t["wide"]),
    "debate average views projection strength 0.5":
        lambda t, inj: lambda h: (h + h @ inj.ops[0].projection.weight.T) / 2,
    "debate gated views noise strength 0.2":  # g = ½: the mean of h and h + 0.2ε
        lambda t, inj: lambda h: h + 0.5 * 0.2 * torch.randn_like(h),
}


def module(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def on_output(formula: Formula) -> Callable:
    def hook(_m: nn.Module, _args: tuple, out: object) -> object:
        if isinstance(out, tuple):
            return (formula(out[0]), *out[1:])
        return formula(out)  # type: ignore[arg-type]

    return hook


def on_input(formula: Formula) -> Callable:
    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
        if args:
            return (formula(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": formula(kwargs["hidden_states"])}

    return hook


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def out_of(result: object) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state  # type: ignore[attr-defined]


def reference(model: nn.Module, inputs: dict[str, torch.Tensor], path: str, formula: Formula,
              site_input: bool = False, *more: tuple[str, Formula, bool]) -> torch.Tensor:
    """The model's output with `formula` applied at the output (or input) of the module at `path`, and
    likewise for each (path, formula, site_input) in `more`."""
    handles = []
    for where, what, at_input in ((path, formula, site_input), *more):
        target = module(model, where)
        if at_input:
            handles.append(target.register_forward_pre_hook(on_input(what), with_kwargs=True))
        else:
            handles.append(target.register_forward_hook(on_output(what)))
    try:
        with torch.no_grad():
            return out_of(model(**inputs))
    finally:
        for handle in handles:
            handle.remove()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) <= 1e-5)


@pytest.fixture(scope="module", params=list(PATHS))
def arch(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("op", list(OPS))
def test_each_op_computes_its_formula_at_a_block_output(arch, op):
    name, model = arch
    blocks = PATHS[name][0]
    for seed in SEEDS:
        t = tensors(seed)
        inputs = batch(seed)
        inj = garage.compile(model, f"at h.1 {op}", bind=t)
        torch.manual_seed(seed)  # random ops draw the same numbers in both runs
        with torch.no_grad():
            got = out_of(inj(**inputs))
        torch.manual_seed(seed)
        want = reference(model, inputs, f"{blocks}.1", OPS[op](t, inj))
        assert close(got, want), (name, op, seed)


@pytest.mark.parametrize("site", ["attn", "mlp", "in", "last", "slice"])
def test_sites_are_where_the_table_says(arch, site):
    name, model = arch
    blocks, attn, mlp = PATHS[name]
    for seed in SEEDS:
        t = tensors(seed)
        inputs = batch(seed)
        add: Formula = lambda h: h + 0.5 * t["v"]  # noqa: E731
        spec, path, formula, site_input = {
            "attn": ("at h.1.attn add v * 0.5", f"{blocks}.1.{attn}", add, False),
            "mlp": ("at h.2.mlp add v * 0.5", f"{blocks}.2.{mlp}", add, False),
            "in": ("at h.2.in add v * 0.5", f"{blocks}.2", add, True),
            "last": ("at h.1[last] add v * 0.5", f"{blocks}.1", at_positions(add, inputs, last=True), False),
            "slice": ("at h.2[1:4] add v * 0.5", f"{blocks}.2", at_positions(add, inputs, start=1, stop=4), False),
        }[site]
        with torch.no_grad():
            got = out_of(garage.compile(model, spec, bind=t)(**inputs))
        assert close(got, reference(model, inputs, path, formula, site_input)), (name, site, seed)


def test_a_block_input_sees_the_previous_blocks_ops(arch):
    """h.2.in is block 1's output as block 2 receives it: ops there run after ops at h.1, whatever the
    order of the statements."""
    name, model = arch
    blocks = PATHS[name][0]
    for seed in SEEDS:
        t, inputs = tensors(seed), batch(seed)
        with torch.no_grad():
            got = out_of(garage.compile(model, "at h.2.in scale -2; at h.1 add v * 0.5", bind=t)(**inputs))
        want = reference(model, inputs, f"{blocks}.1", lambda h: h + 0.5 * t["v"], False,
                         (f"{blocks}.2", lambda h: -2 * h, True))
        assert close(got, want), (name, seed)


def at_positions(formula: Formula, inputs: dict[str, torch.Tensor], last: bool = False,
                 start: int = 0, stop: int = 0) -> Formula:
    """The formula applied at some positions only: the last one of the call, or absolute positions
    start ≤ p < stop counted from the first real token (padding never counts)."""
    mask = inputs["attention_mask"]

    def apply(h: torch.Tensor) -> torch.Tensor:
        shaped = h.reshape(mask.shape[0], mask.shape[1], -1)
        if last:
            chosen = torch.zeros_like(mask, dtype=torch.bool)
            chosen[:, -1] = True
        else:
            position = mask.cumsum(-1) - 1
            chosen = (mask == 1) & (position >= start) & (position < stop)
        return torch.where(chosen[..., None], formula(shaped), shaped).reshape(h.shape)

    return apply


# ------------------------------------------------------------------ properties of meaning
def captured(model: nn.Module, spec: str, inputs: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    inj = garage.compile(model, spec, bind=t)
    with torch.no_grad():
        inj(**inputs)
    return inj.captures["c"]


@pytest.mark.parametrize("seed", SEEDS)
def test_after_ablate_the_state_is_orthogonal_to_the_direction(seed):
    model, t, inputs = tiny_model("llama"), tensors(seed), batch(seed)
    h = captured(model, "at h.2 ablate d; at h.2 capture c", inputs, t)
    unit = t["d"] / t["d"].norm()
    assert (h @ unit).abs().max() < 1e-5 * h.abs().max()
    assert h.abs().max() > 0.1  # not trivially zero


@pytest.mark.parametrize("seed", SEEDS)
def test_scale_zero_then_add_leaves_exactly_the_vector(seed):
    model, t, inputs = tiny_model("gpt2"), tensors(seed), batch(seed)
    h = captured(model, "at h.1 scale 0; at h.1 add v; at h.1 capture c", inputs, t)
    assert torch.equal(h, t["v"].expand_as(h))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_scale_at_block_k_is_f_times_the_hidden_state_hf_reports(k):
    model, t, inputs = tiny_model("llama"), tensors(k), batch(k)
    h = captured(model, f"at h.{k} scale 0.37; at h.{k} capture c", inputs, t)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True).hidden_states[k + 1]
    assert torch.allclose(h, 0.37 * plain, atol=1e-6)


# Per architecture, by hand: the FFN's down projection inside a block, whose input is `h.I.mlp.hidden` (the
# intermediate activation, after any gate). MoE families have no single one: garage refuses the site there.
DOWN: dict[str, str | None] = {
    "gpt2": "mlp.c_proj", "llama": "mlp.down_proj", "qwen2": "mlp.down_proj", "mistral": "mlp.down_proj",
    "gpt_neox": "mlp.dense_4h_to_h", "phi3": "mlp.down_proj", "gemma2": "mlp.down_proj",
    "gemma3": "mlp.down_proj", "opt": "fc2", "bert": "output.dense",
    "mixtral": None, "qwen2_moe": None, "qwen3_moe": None,
}
FFN_OPS: dict[str, Callable[[dict[str, torch.Tensor]], Formula]] = {
    "scale -1.7": lambda t: lambda h: -1.7 * h,
    "zero": lambda t: lambda h: torch.zeros_like(h),
    "add w * 0.5": lambda t: lambda h: h + 0.5 * t["w"],
    "ablate e": lambda t: lambda h: ablated(h, t["e"]),
    "capture c": lambda t: lambda h: h,
}


@pytest.mark.parametrize("op", list(FFN_OPS))
def test_the_ffn_hidden_layer_is_the_down_projections_input(arch, op):
    name, model = arch
    blocks = PATHS[name][0]
    if DOWN[name] is None:
        with pytest.raises(garage.GarageError, match="mixture-of-experts"):
            garage.compile(model, f"at h.1.mlp.hidden {op}", bind={"w": torch.randn(INTERMEDIATE)})
        return
    for seed in SEEDS:
        g = torch.Generator().manual_seed(900 + seed)
        t = {"w": torch.randn(INTERMEDIATE, generator=g), "e": torch.randn(INTERMEDIATE, generator=g)}
        inputs = batch(seed)
        inj = garage.compile(model, f"at h.1.mlp.hidden {op}", bind=t)
        with torch.no_grad():
            got = out_of(inj(**inputs))
        seen: list[torch.Tensor] = []
        formula = FFN_OPS[op](t)
        want = reference(model, inputs, f"{blocks}.1.{DOWN[name]}", lambda h: seen.append(h) or formula(h), True)
        assert close(got, want), (name, op, seed)
        if op.startswith("capture"):
            assert torch.equal(inj.captures["c"], seen[0]) and seen[0].shape[-1] == INTERMEDIATE


def test_a_vector_for_the_ffn_hidden_layer_must_have_its_width(arch):
    name, model = arch
    if DOWN[name] is None:
        return
    report = garage.check(model, "at h.1.mlp.hidden add w", bind={"w": torch.randn(HIDDEN)})
    (error,) = report.errors
    assert f"h.1.mlp.hidden's width is {INTERMEDIATE}" in error.message


# Quoted module paths whose output is not hidden-wide (written by hand): the checker knows their width.
WIDE_MODULES = {"gpt2": "transformer.h.1.mlp.c_fc", "llama": "model.layers.1.mlp.up_proj",
                "gpt_neox": "gpt_neox.layers.1.mlp.dense_h_to_4h", "opt": "model.decoder.layers.1.fc1"}


@pytest.mark.parametrize("name", list(WIDE_MODULES))
def test_a_quoted_module_of_another_width_takes_its_own_vectors(name):
    model, path = tiny_model(name), WIDE_MODULES[name]
    for seed in SEEDS:
        w = torch.randn(INTERMEDIATE, generator=torch.Generator().manual_seed(700 + seed))
        inputs = batch(seed)
        inj = garage.compile(model, f'at "{path}" add w * 0.5; at "{path}" capture x', bind={"w": w})
        with torch.no_grad():
            got = out_of(inj(**inputs))
        seen: list[torch.Tensor] = []
        want = reference(model, inputs, path, lambda h: seen.append(h + 0.5 * w) or h + 0.5 * w)
        assert close(got, want) and torch.equal(inj.captures["x"], seen[0]), (name, seed)
    (error,) = garage.check(model, f'at "{path}" add w', bind={"w": torch.randn(HIDDEN)}).errors
    assert f"width is {INTERMEDIATE}" in error.message
