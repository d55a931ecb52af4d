"""Attention heads and MoE routers, checked against references written here.

Nothing below uses garage's ops, resolver or hook backend to compute an expected value. Each family's
output projection and router paths come from the hand-written tables below. Heads are split with this
file's own reshape; router logits are caught as the first `F.linear` result inside the router's forward
(garage finds them by shape instead), and every router op's formula is written inline.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from test_reference import PATHS, ablated, batch, close, module, out_of, reference
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from zoo import EXPERTS, HEADS, HIDDEN, MOE_NAMES, tiny_model

import garage
from garage.runtime.hooks import attach

HEAD_SIZE = HIDDEN // HEADS
Formula = Callable[[torch.Tensor], torch.Tensor]

# Per family, by hand: inside a block, attention's output projection (its input holds every head's output).
HEAD_OUT = {
    "gpt2": "attn.c_proj", "llama": "self_attn.o_proj", "qwen2": "self_attn.o_proj",
    "gpt_neox": "attention.dense", "phi3": "self_attn.o_proj", "gemma2": "self_attn.o_proj",
    "opt": "self_attn.out_proj", "bert": "attention.output.dense", "mixtral": "self_attn.o_proj",
}
# Per MoE family, by hand: the block list, and inside a block the router.
ROUTER = {
    "mixtral": ("model.layers", "mlp.gate"), "qwen2_moe": ("model.layers", "mlp.gate"),
    "qwen3_moe": ("model.layers", "mlp.gate"), "olmoe": ("model.layers", "mlp.gate"),
    "phimoe": ("model.layers", "mlp.router"), "granitemoe": ("model.layers", "block_sparse_moe.router"),
    "deepseek_v2": ("model.layers", "mlp.gate"), "deepseek_v3": ("model.layers", "mlp.gate"),
    "jetmoe": ("model.layers", "mlp.router"), "gpt_oss": ("model.layers", "mlp.router"),
}
assert set(ROUTER) == set(MOE_NAMES)


def on_heads(formula: Formula, chosen: list[int] | None) -> Formula:
    """The formula applied to some heads of [..., heads × size]: it sees [..., k, size]."""
    def apply(h: torch.Tensor) -> torch.Tensor:
        split = h.reshape(*h.shape[:-1], HEADS, HEAD_SIZE).clone()
        which = list(range(HEADS)) if chosen is None else chosen
        split[..., which, :] = formula(split[..., which, :])
        return split.reshape(h.shape)
    return apply


def last_only(formula: Formula) -> Formula:
    def apply(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[:, -1] = formula(h)[:, -1]
        return out
    return apply


HEAD_OPS: dict[str, Callable[[dict[str, torch.Tensor]], Formula]] = {
    "scale -1.7": lambda t: lambda h: -1.7 * h,
    "zero": lambda t: lambda h: torch.zeros_like(h),
    "add w * 0.5": lambda t: lambda h: h + 0.5 * t["w"],
    "ablate e": lambda t: lambda h: ablated(h, t["e"]),
    "capture c": lambda t: lambda h: h,
}
SELECTIONS = {"": None, "{1, 3}": [1, 3], "{2}[last]": [2]}


@pytest.fixture(scope="module", params=list(HEAD_OUT))
def headed(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("op", list(HEAD_OPS))
def test_each_op_acts_on_the_chosen_heads_only(headed, op):
    name, model = headed
    for seed, (selection, chosen) in enumerate(SELECTIONS.items()):
        g = torch.Generator().manual_seed(300 + seed)
        t = {"w": torch.randn(HEAD_SIZE, generator=g), "e": torch.randn(HEAD_SIZE, generator=g)}
        inputs = batch(seed)
        inj = garage.compile(model, f"at h.1.attn.heads{selection} {op}", bind=t)
        hooks, _ = garage.hook(model, f"at h.1.attn.heads{selection} {op}", bind=t)
        with torch.no_grad():
            got = out_of(inj(**inputs))
            with hooks:
                hooked = out_of(model(**inputs))
        seen: list[torch.Tensor] = []
        formula = on_heads(HEAD_OPS[op](t), chosen)
        if selection.endswith("[last]"):
            formula = last_only(formula)
        want = reference(model, inputs, f"{PATHS[name][0]}.1.{HEAD_OUT[name]}",
                         lambda h: seen.append(h) or formula(h), True)
        assert close(got, want) and close(hooked, want), (name, op, selection)
        if op.startswith("capture"):
            heads = seen[0].reshape(*seen[0].shape[:-1], HEADS, HEAD_SIZE)[..., chosen or list(range(HEADS)), :]
            if selection.endswith("[last]"):
                heads = torch.cat([torch.zeros_like(heads[:, :-1]), heads[:, -1:]], dim=1)
            assert torch.equal(inj.captures["c"], heads), (name, selection)
        else:
            assert not close(got, out_of(model(**inputs))), (name, op, selection)  # it did something


def test_analysis_captures_the_chosen_heads():
    model, inputs = tiny_model("gpt2"), batch(1)
    states = garage.analyze.capture(model, "h.2.attn.heads{1, 3}", inputs)
    seen: list[torch.Tensor] = []
    handle = module(model, "transformer.h.2.attn.c_proj").register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    assert torch.equal(states["h.2.attn.heads{1, 3}"], seen[0].reshape(3, 9, HEADS, HEAD_SIZE)[..., [1, 3], :])


def test_a_vector_for_heads_has_the_head_size():
    model = tiny_model("llama")
    (error,) = garage.check(model, "at h.1.attn.heads add w", bind={"w": torch.randn(HIDDEN)}).errors
    assert f"h.1.attn.heads's head size is {HEAD_SIZE}" in error.message
    (error,) = garage.check(model, "at h.1.attn.heads{7} zero").errors
    assert f"this model has {HEADS} attention heads" in error.message and error.column == 4


def test_a_head_set_needs_a_heads_site():
    with pytest.raises(garage.SpecError, match="chooses attention heads, and this site has none"):
        garage.parse("at h.1.attn{0} zero")


def test_a_module_at_heads_sees_the_chosen_heads():
    class PerHead(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            assert h.shape[-2:] == (2, HEAD_SIZE)
            return h.flip(-2)  # swaps the two chosen heads

    model, inputs = tiny_model("llama"), batch(0)
    inj = garage.compile(model, "at h.1.attn.heads{0, 2} module swap", bind={"swap": PerHead()})
    want = reference(model, inputs, "model.layers.1.self_attn.o_proj", on_heads(lambda h: h.flip(-2), [0, 2]), True)
    with torch.no_grad():
        assert close(out_of(inj(**inputs)), want)

    class Flat(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h.flatten(-2)

    (error,) = garage.check(model, "at h.1.attn.heads{0, 2} module flat", bind={"flat": Flat()}).errors
    assert "maps [batch, seq, 2, 16] to [batch, seq, 32]" in error.message


# ------------------------------------------------------------------ routers
class FirstLinear(TorchFunctionMode):
    """Applies `formula` to the first F.linear result computed while active: a router's logits."""

    def __init__(self, formula: Formula) -> None:
        super().__init__()
        self.formula, self.done = formula, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and not self.done:
            self.done = True
            return self.formula(out)
        return out


def router_reference(model: nn.Module, inputs: dict[str, torch.Tensor], path: str, formula: Formula) -> torch.Tensor:
    """The model's output with `formula` applied to the first F.linear result inside the module at `path`."""
    target = module(model, path)
    modes: list[FirstLinear] = []

    def enter(*_: object) -> None:
        modes.append(FirstLinear(formula))
        modes[-1].__enter__()

    handles = [target.register_forward_pre_hook(enter),
               target.register_forward_hook(lambda *_: modes.pop().__exit__(None, None, None))]
    try:
        with torch.no_grad():
            return out_of(model(**inputs))
    finally:
        for handle in handles:
            handle.remove()


def lowest(x: torch.Tensor) -> float:
    return torch.finfo(x.dtype).min


def with_columns(x: torch.Tensor, columns: list[int], value: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    out = x.clone()
    out[..., columns] = value(out[..., columns])
    return out


ROUTER_OPS: dict[str, Callable[[dict[str, torch.Tensor]], Formula]] = {
    "bias {1, 2} * 8": lambda t: lambda x: with_columns(x, [1, 2], lambda c: c + 8),
    "bias p * 3": lambda t: lambda x: x + 3 * t["p"],
    "mask {0, 2}": lambda t: lambda x: with_columns(x, [0, 2], lambda c: torch.full_like(c, lowest(x))),
    "force 3": lambda t: lambda x: with_columns(x, [0, 1, 2], lambda c: torch.full_like(c, lowest(x))),
    "scale 0.5": lambda t: lambda x: 0.5 * x,
    "capture r": lambda t: lambda x: x,
}


@pytest.fixture(scope="module", params=list(ROUTER))
def moe(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("op", list(ROUTER_OPS))
def test_each_router_op_changes_the_logits_before_routing(moe, op):
    name, model = moe
    for seed in (0, 1):
        t = {"p": torch.randn(EXPERTS, generator=torch.Generator().manual_seed(40 + seed))}
        inputs = batch(seed)
        for backend in (garage.compile, garage.hook):
            if backend is garage.compile:
                with torch.no_grad():
                    got = out_of(garage.compile(model, f"at h.2.router {op}", bind=t)(**inputs))
            else:
                hooks, prepared = garage.hook(model, f"at h.2.router {op}", bind=t)
                with hooks, torch.no_grad():
                    got = out_of(model(**inputs))
            seen: list[torch.Tensor] = []
            formula = ROUTER_OPS[op](t)
            blocks, router = ROUTER[name]
            want = router_reference(model, inputs, f"{blocks}.2.{router}", lambda x: seen.append(x) or formula(x))
            assert close(got, want), (name, op, seed, backend.__name__)
        if op.startswith("capture"):
            inj = garage.compile(model, f"at h.2.router {op}")
            with torch.no_grad():
                inj(**inputs)
            assert torch.equal(inj.captures["r"], seen[0]) and seen[0].shape[-1] == EXPERTS
        elif not op.startswith("scale"):  # (PhiMoE's sparsemixer routing may not notice a scale)
            assert not close(got, out_of(model(**inputs))), (name, op)  # the routing moved


def test_force_sends_every_token_to_one_expert_with_weight_1():
    """Mixtral's MoE output under `force 3` is expert 3's FFN alone, computed here from its weights."""
    model, inputs = tiny_model("mixtral"), batch(3)
    inj = garage.compile(model, "at h.2.router force 3; at h.2.mlp capture out")
    seen: list[torch.Tensor] = []  # the MoE block's input: upstream of the router, so the same without the spec
    handle = model.model.layers[2].post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        inj(**inputs)
        model(**inputs)
        handle.remove()
        experts = model.model.layers[2].mlp.experts
        gate, up = F.linear(seen[0], experts.gate_up_proj[3]).chunk(2, dim=-1)
        alone = F.linear(F.silu(gate) * up, experts.down_proj[3])
    assert torch.allclose(inj.captures["out"], alone, atol=1e-6)


def test_a_quoted_norm_is_its_output_not_its_cast_input():
    """An RMSNorm's no-op float32 cast of its input is read outside the norm too (by the residual add):
    the norm's output is the value that depends on it."""
    model, inputs = tiny_model("llama"), batch(1)
    inj = garage.compile(model, 'at "model.layers.2.post_attention_layernorm" capture x')
    seen: list[torch.Tensor] = []
    handle = model.model.layers[2].post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        inj(**inputs)
        model(**inputs)
    handle.remove()
    assert torch.equal(inj.captures["x"], seen[0])


def test_router_ops_are_checked_against_the_router():
    model = tiny_model("mixtral")
    cases = {
        "at h.1 force 2": "`force` acts on router logits, and h.1 is not a router",
        "at h.1.router bias {4} * 2": f"expert 4 is out of range: this router scores {EXPERTS} experts",
        f"at h.1.router mask {{0..{EXPERTS - 1}}}": f"this masks all {EXPERTS} experts",
        "at h.1.router add v": f"h.1.router's number of experts is {EXPERTS}",
    }
    for spec, message in cases.items():
        (error,) = garage.check(model, spec, bind={"v": torch.randn(HIDDEN)}).errors
        assert message in error.message, (spec, error.message)
    (error,) = garage.check(tiny_model("llama"), "at h.1.router capture r").errors
    assert "no mixture-of-experts router" in error.message
    (error,) = garage.check(tiny_model("deepseek_v3"), "at h.0.router capture r").errors
    assert "block 0 has a dense MLP" in error.message and "routes in blocks 1..3" in error.hint


def test_a_quoted_router_path_is_the_router_site():
    model, inputs = tiny_model("olmoe"), batch(2)
    quoted = garage.compile(model, 'at "model.layers.1.mlp.gate" bias {0} * 5')
    named = garage.compile(model, "at h.1.router bias {0} * 5")
    assert quoted.plan.steps[0].site.kind == "router"
    with torch.no_grad():
        assert torch.equal(out_of(quoted(**inputs)), out_of(named(**inputs)))


# ------------------------------------------------------------------ generation and analysis
GENERATE = {
    "llama": "at h.1.attn.heads{0, 3}[new] zero; at h.2.attn.heads{1}[prompt] scale 2; at h.1.attn.heads[new] capture c",
    "mixtral": "at h.1.router[new] force 2; at h.2.router bias {1} * 4; at h.0.attn.heads{2} scale -1",
    "deepseek_v3": "at h.1.router[new] mask {0, 1}; at h.2.attn.heads{1, 2}[new] zero",
}


@pytest.mark.parametrize("name", list(GENERATE))
def test_greedy_tokens_equal_model_generate_with_hooks(name):
    model = tiny_model(name)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    injected = garage.compile(model, GENERATE[name])
    out = injected.generate(ids, attention_mask=mask, max_new_tokens=12)
    with attach(model, [s.site for s in injected.plan], list(injected.ops)):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, expected) and not torch.equal(out, plain)


def independent_shares(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    mass = logits.softmax(-1).mean(0)
    slots = torch.bincount(logits.topk(top_k, -1).indices.flatten(), minlength=logits.shape[-1]).float()
    return mass, slots / slots.sum()


def test_routing_reports_each_experts_share_beside_the_plain_models():
    model = tiny_model("mixtral")
    inputs = {"input_ids": torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(8))}
    layers = garage.analyze.routing(model, "at h.1.router bias {1} * 3; at h.2.router force 3", inputs)
    assert [r.site for r in layers] == [f"h.{i}.router" for i in range(4)]
    with torch.no_grad():
        plain = model(**inputs, output_router_logits=True).router_logits  # the model's own record, per layer
    for layer, logits in zip(layers, plain):
        mass, slots = independent_shares(logits, 2)
        assert torch.allclose(torch.tensor(layer.plain_mass), mass, atol=1e-6)
        assert torch.allclose(torch.tensor(layer.plain_slots), slots, atol=1e-6)
    assert layers[0].mass == layers[0].plain_mass and layers[0].chosen == ()
    assert layers[1].chosen == (1,) and layers[1].chosen_slots > layers[1].plain_chosen_slots
    assert layers[2].chosen == (3,) and layers[2].chosen_slots == 1.0 and layers[2].mass[3] == pytest.approx(1.0)
    table = garage.analyze.routing_table(layers)
    assert "h.2.router" in table and "chosen" in table


def test_routing_needs_a_router():
    with pytest.raises(ValueError, match="no mixture-of-experts router"):
        garage.analyze.routing(tiny_model("llama"), None, torch.ones(1, 3, dtype=torch.long))


@pytest.mark.slow
def test_heads_and_router_ops_compile_as_one_graph_and_save(tmp_path):
    model = tiny_model("mixtral", seed=2)
    spec = ("at h.1.attn.heads{0, 2}[last] zero; at h.2.attn.heads add w; at h.3.attn.heads capture c\n"
            "at h.1.router bias {1} * 6; at h.2.router mask {0}; at h.3.router force 2; at h.3.router capture r")
    bind = {"w": torch.randn(HEAD_SIZE)}
    eager = garage.compile(model, spec, bind=bind)
    compiled = garage.compile(model, spec, bind=bind, compile=True)  # fullgraph: no graph breaks allowed
    inputs = batch(4)
    with torch.no_grad():
        want = eager(**inputs).logits
        assert torch.allclose(compiled(**inputs).logits, want, atol=1e-4)
    program = garage.load_artifact(eager.save(tmp_path / "routed.pt2"))
    assert torch.allclose(program(**inputs), want, atol=1e-5)
