"""The graph backend equals the hook backend: every op × every site kind × 13 architectures.

Both backends run the very same op objects, on random padded batches, with several seeds. Random ops
(`noise always`, noisy debate views) see the same torch seed in both runs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ARCH_NAMES, tiny_model

import garage
from garage.fx.kinds import Unpadded
from garage.runtime.hooks import attach

HIDDEN = 64


class Shift(nn.Module):
    """A user module registered by name, with a spec-given argument."""

    def __init__(self, by: float) -> None:
        super().__init__()
        self.by = by

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.by * h.tanh()


garage.register("shift", Shift)
SEEDS = (0, 1)
# MoE families run their experts one by one, eagerly, in both backends: they take one seed (the CI budget).
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def seeds_for(name: str) -> tuple[int, ...]:
    return SEEDS[:1] if name in MOE else SEEDS

# ops that must change the output at every site (capture, identity and eval-mode noise must not)
CHANGING_OPS = {
    "scale": "scale -1.7",  # negative: RMSNorm is blind to positive scale
    "add": "add vec * 0.5",
    "ablate": "ablate direction",
    "zero": "zero",
    "clamp": "clamp -0.001 0.001",
    "noise_always": "noise 0.3 always",
    "module_registered": "module shift(by=0.25)",
    "module_bound": "module adapter",
    "blade_identity": "blade identity from blade_vec alpha 0.7",
    "blade_gated": "blade gated from blade_vec",
    "blade_module": "blade gated from blade_net alpha 0.5",
    "blade_topk": "blade gated from wide_vec project topk",
    "blade_linear": "blade identity from wide_vec project linear",
    "chamber": "blade gated",
    "debate_average": "debate average views projection strength 0.5",
    "debate_confidence": "debate confidence views noise strength 0.5",
    "debate_gated": "debate gated views projection",
}
NEUTRAL_OPS = {
    "capture": "capture seen",
    "noise_eval": "noise 0.3",
    "module_noise_eval": "module noise(std=0.5)",
    "debate_dropout_eval": "debate gated views dropout strength 0.5",
}


def bindings(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    adapter = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
    blade_net = nn.Linear(HIDDEN, HIDDEN)
    return {
        "vec": torch.randn(HIDDEN, generator=g),
        "direction": torch.randn(HIDDEN, generator=g),
        "blade_vec": torch.randn(HIDDEN, generator=g),
        "wide_vec": torch.randn(3 * HIDDEN, generator=g),
        "adapter": adapter,
        "blade_net": blade_net,
    }


def sites_for(model: nn.Module) -> list[str]:
    info = garage.ModelInfo.from_model(model)
    embeddings = next(name for name, m in model.named_modules() if m is model.get_input_embeddings())
    sites = ["h.1", "h.2.in", "h.1.attn", "h.2.mlp", "embed", f'"{embeddings}"', "h.-1[last]", "h.1[1:4]"]
    if info.final_norm:
        sites.append("final")
    return sites


def batch(seed: int, vocab: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run_both(model: nn.Module, spec: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, garage.InjectedModel]:
    torch.manual_seed(seed)  # builds the ops: projection views draw their weights here
    inj = garage.compile(model, spec, bind=bindings(seed))
    inputs = batch(seed)
    torch.manual_seed(1000 + seed)
    graph_out = logits(inj(**inputs))
    graph_captures = dict(inj.captures)
    inj.captures.clear()  # the hook run must record its own values
    with attach(model, [s.site for s in inj.plan], list(inj.ops)):
        torch.manual_seed(1000 + seed)
        hook_out = logits(model(**inputs))
    assert set(graph_captures) == set(inj.captures)
    for key, value in graph_captures.items():
        assert torch.allclose(value, inj.captures[key], rtol=1e-5, atol=1e-6), key
    return graph_out, hook_out, inj


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = b.abs().max().clamp_min(1e-6)
    assert ((a - b).abs().max() / scale).item() <= 1e-5


@pytest.fixture(scope="module", params=ARCH_NAMES)
def arch(request):
    model = tiny_model(request.param)
    with torch.no_grad():
        plain = {seed: logits(model(**batch(seed))) for seed in SEEDS}
    return request.param, model, plain


def test_empty_spec_equals_the_model_exactly(arch):
    _, model, plain = arch
    inj = garage.compile(model, "")
    with torch.no_grad():
        for seed in SEEDS:
            assert torch.equal(logits(inj(**batch(seed))), plain[seed])


@pytest.mark.parametrize("op_name", sorted(CHANGING_OPS))
def test_changing_ops_agree_with_hooks_at_every_site(arch, op_name):
    name, model, plain = arch
    for site in sites_for(model):
        for seed in seeds_for(name):
            with torch.no_grad():
                graph_out, hook_out, _ = run_both(model, f"at {site} {CHANGING_OPS[op_name]}", seed)
            assert_close(graph_out, hook_out)
            assert not torch.allclose(graph_out, plain[seed], atol=1e-6), f"{name}: {site} {op_name} changed nothing"


@pytest.mark.parametrize("op_name", sorted(NEUTRAL_OPS))
def test_neutral_ops_agree_and_change_nothing(arch, op_name):
    _, model, plain = arch
    for site in sites_for(model):
        with torch.no_grad():
            graph_out, hook_out, _ = run_both(model, f"at {site} {NEUTRAL_OPS[op_name]}", SEEDS[0])
        assert torch.equal(graph_out, plain[SEEDS[0]])
        assert torch.equal(hook_out, plain[SEEDS[0]])


def test_many_statements_at_once_agree(arch):
    _, model, plain = arch
    spec = """
    at embed scale 1.1
    at h.0 add vec * 0.1; at h.1.in scale 0.9; at h.0 clamp -2 2
    at h.*.mlp capture mlp_out
    at h.{1, N-1}.attn scale 0.8
    at h.2[last] blade gated from blade_vec
    at N-1 noise 0.1 always
    at h.1..2 ablate direction
    """
    for seed in SEEDS:
        with torch.no_grad():
            graph_out, hook_out, inj = run_both(model, spec, seed)
        assert_close(graph_out, hook_out)
        assert sorted(inj.captures) == [f"mlp_out.{i}" for i in range(4)]


def test_positions_touch_only_their_positions(arch):
    _, model, _ = arch
    inputs = batch(0)
    inj = garage.compile(model, "at h.0 capture before; at h.0[2:5] zero; at h.0 capture after")
    with torch.no_grad():
        inj(**inputs)
    before, after = inj.captures["before"], inj.captures["after"]
    if before.dim() == 2:  # flat [batch*seq, hidden]
        before, after = before.view(3, 9, -1), after.view(3, 9, -1)
    absolute = inputs["attention_mask"].cumsum(-1) - 1
    touched = ((absolute >= 2) & (absolute < 5) & inputs["attention_mask"].bool()).unsqueeze(-1)
    assert torch.equal(after, torch.where(touched, torch.zeros_like(before), before))


def test_unpadded_batches_take_the_causal_path_and_agree(arch):
    """Without padding, the injected graph leaves the mask out and SDPA runs causal; hooks still agree."""
    name, model, _ = arch
    inputs = {"input_ids": batch(3)["input_ids"]}
    spec = "at h.1 scale -1.3; at h.2[last] add vec; at h.0.mlp[1:4] clamp -0.01 0.01; at h.3 capture c"
    torch.manual_seed(0)
    inj = garage.compile(model, spec, bind=bindings())
    with torch.no_grad():
        graph_out = logits(inj(**inputs))
        with attach(model, [s.site for s in inj.plan], list(inj.ops)):
            hook_out = logits(model(**inputs))
    assert_close(graph_out, hook_out)
    graphs = inj.backend._graphs
    if Unpadded() in graphs:
        sdpa = [n for n in graphs[Unpadded()].graph_module.graph.nodes if "scaled_dot_product" in str(n.target)]
        assert sdpa and all(n.args[3] is None and n.args[5] is True for n in sdpa)  # no mask, is_causal
    else:
        assert name in ("qwen2", "mistral", "gemma2", "gemma3", "bert")  # sliding windows, eager, encoder
