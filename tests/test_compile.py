"""garage.compile end to end: output types, non-destructiveness, caching, explain, parameters, files."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle

import re

import pytest
import torch
from safetensors.torch import save_file
from zoo import tiny_model

import garage


def ids_and_mask(seed: int = 0, batch: int = 2, seq: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def fingerprint(model: torch.nn.Module) -> tuple:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    modes = tuple(m.training for m in model.modules())
    return digest.hexdigest(), hooks, modes, model.config.to_json_string()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_output_type_and_values(llama):
    inputs = ids_and_mask()
    inj = garage.compile(llama, "at h.1 scale 0.5")
    out, ref = inj(**inputs), llama(**inputs)
    assert type(out) is type(ref)
    assert out.logits.shape == ref.logits.shape
    assert not torch.allclose(out.logits, ref.logits)


def test_missing_attention_mask_means_all_ones(llama):
    inputs = ids_and_mask()
    inj = garage.compile(llama, "")
    ones = torch.ones_like(inputs["input_ids"])
    assert torch.equal(inj(input_ids=inputs["input_ids"]).logits, llama(input_ids=inputs["input_ids"], attention_mask=ones).logits)


def test_the_model_is_never_changed(llama):
    before = fingerprint(llama)
    inj = garage.compile(llama, "at h.1 scale 0.5; at h.2 blade gated; at h.0 capture x", compile=False)
    inj(**ids_and_mask())
    inj.train()
    assert fingerprint(llama) == before
    with pytest.raises(garage.GarageError):
        garage.compile(llama, "at h.1 scale 0.5; at h.9 zero; at h.1 add nothing_bound")
    with pytest.raises(garage.GarageError):
        garage.compile(llama, "at h.1 add nothing_bound")
    assert fingerprint(llama) == before


def test_hook_backend_restores_the_model(llama):
    before = fingerprint(llama)
    hooks, _ = garage.hook(llama, "at h.1 scale 0.5; at h.2.in[last] zero; at final capture f")
    assert fingerprint(llama)[1] > before[1]
    with hooks:
        llama(**ids_and_mask())
    assert fingerprint(llama) == before


def test_a_second_spec_does_not_trace_again(caplog):
    model = tiny_model("gpt2", seed=3)
    with caplog.at_level(logging.INFO, logger="garage"):
        garage.compile(model, "at h.1 scale 0.5")
        garage.compile(model, "at h.2 zero; at h.3.mlp capture m")
    made = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("exported the", "loaded the cached"))]
    assert len(made) == 1 and "step graph" in made[0]  # a causal LM is checked on its generation step


def test_hooks_on_the_model_stay_out_of_every_traced_graph():
    """A hook present while garage traces (a LayerInjector's, say) is not baked into any injected graph."""
    model = tiny_model("llama", seed=4)
    inputs = ids_and_mask(seed=4)
    ids = inputs["input_ids"][1:]  # unpadded: the unpadded scoring graph and generation
    handle = model.model.layers[1].register_forward_hook(lambda _m, _a, out: out * 0.0)
    try:
        inj = garage.compile(model, "at h.2 scale 1.0")
        scored = inj(**inputs).logits
        unpadded = inj(input_ids=ids).logits
        generated = inj.generate(ids, max_new_tokens=4)
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.allclose(scored, model(**inputs).logits, atol=1e-5)
        assert torch.allclose(unpadded, model(input_ids=ids).logits, atol=1e-5)
        assert torch.equal(generated, model.generate(ids, max_new_tokens=4, do_sample=False))


def test_explain_has_one_row_a_site(llama):
    inj = garage.compile(llama, garage.parse("at h.1 scale 0.5\nat h.{0, 2}.mlp capture m", filename="e.garage"))
    rows = inj.explain().splitlines()
    assert rows[0].split() == ["line:col", "site", "module", "path", "shape", "fx", "node", "op"]
    assert rows[1].split()[:3] == ["1:1", "h.1", "model.layers.1"]
    assert rows[1].split()[-2:] == ["scale", "0.5"]
    assert [r.split()[1] for r in rows[2:]] == ["h.0.mlp", "h.2.mlp"]
    assert all("[batch, seq, 64]" in r for r in rows[1:])
    fx_nodes = {n.name for n in inj.graph_module.graph.nodes}
    assert all(r.split()[6] in fx_nodes for r in rows[1:])  # after the three words of the shape
    assert "garage_op_0" in inj.graph_module.code


def test_parameters_are_only_the_injected_ones(llama):
    inj = garage.compile(llama, "at h.1 blade gated from v; at h.2 scale 0.5", bind={"v": torch.randn(64)})
    params = dict(inj.named_parameters())
    assert params and all(name.startswith("ops.0.gate.") for name in params)
    assert all(p.requires_grad for p in params.values())
    llama.zero_grad(set_to_none=True)
    inj(**ids_and_mask()).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    llama.zero_grad(set_to_none=True)


def test_injected_parameters_follow_the_model_dtype():
    model = tiny_model("gpt2").to(torch.bfloat16)
    inj = garage.compile(model, "at h.1 blade gated from v; at h.2 debate gated", bind={"v": torch.randn(64)})
    assert {p.dtype for p in inj.parameters()} == {torch.bfloat16}
    out = inj(**ids_and_mask())
    assert out.logits.dtype == torch.bfloat16


def test_a_strength_change_takes_effect_without_recompiling(llama):
    inj = garage.compile(llama, "at h.1 scale 0.5")
    gm = inj.graph_module
    first = inj(**ids_and_mask()).logits
    inj.ops[0].factor.fill_(1.0)
    assert inj.graph_module is gm
    assert torch.equal(inj(**ids_and_mask()).logits, llama(**ids_and_mask()).logits)
    assert not torch.equal(first, llama(**ids_and_mask()).logits)


def test_noise_follows_train_and_eval(llama):
    inj = garage.compile(llama, "at h.1 noise 0.5")
    plain = llama(**ids_and_mask()).logits
    assert torch.equal(inj(**ids_and_mask()).logits, plain)
    inj.train()
    torch.manual_seed(0)
    noisy = inj(**ids_and_mask()).logits
    torch.manual_seed(0)
    assert torch.equal(inj(**ids_and_mask()).logits, noisy)
    assert not torch.allclose(noisy, plain)


def test_captures_are_detached_and_replaced_each_call(llama):
    inj = garage.compile(llama, "at h.1 capture one; at h.*.mlp capture every")
    inj(**ids_and_mask(batch=2, seq=7))
    assert inj.captures["one"].shape == (2, 7, 64) and not inj.captures["one"].requires_grad
    assert sorted(inj.captures) == ["every.0", "every.1", "every.2", "every.3", "one"]
    inj(**ids_and_mask(batch=1, seq=5))
    assert inj.captures["one"].shape == (1, 5, 64)


def test_spec_from_a_path_reads_files_beside_it(tmp_path, llama):
    vec = torch.randn(64)
    save_file({"steer": vec}, str(tmp_path / "steer.safetensors"))
    torch.save({"a": vec, "b": -vec}, tmp_path / "two.pt")
    (tmp_path / "s.garage").write_text('at h.1 add "steer.safetensors" * 2\nat h.2 add "two.pt#b"\n')
    from_file = garage.compile(llama, tmp_path / "s.garage")(**ids_and_mask()).logits
    bound = garage.compile(llama, "at h.1 add v * 2; at h.2 add w", bind={"v": vec, "w": -vec})(**ids_and_mask()).logits
    assert torch.equal(from_file, bound)


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("statement", ['at h.1 add "evil.pt"', 'at h.1 blade gated from "evil.pt"'])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, llama, statement):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"v": _Payload(str(marker))}, f)
    (tmp_path / "s.garage").write_text(statement + "\n")
    with pytest.raises(garage.ValidationError) as err:
        garage.compile(llama, tmp_path / "s.garage")
    assert "would run code" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "statement, message",
    [
        ('at h.1 add "nope.safetensors"', "file not found: nope.safetensors"),
        ("at h.1 add steer", "'steer' is not bound"),
        ("at h.1 module nosie", "unknown module 'nosie'"),
        ("at h.1 module noise(sd=1)", "module noise rejects its arguments"),
    ],
)
def test_build_errors_name_the_statement(llama, statement, message):
    with pytest.raises(garage.ValidationError) as err:
        garage.compile(llama, garage.parse(statement, filename="b.garage"))
    [d] = err.value.diagnostics
    assert message in d.message and d.filename == "b.garage" and d.line == 1


def test_bound_modules_and_registered_classes(llama):
    adapter = torch.nn.Linear(64, 64)
    inj = garage.compile(llama, "at h.1 module adapter; at h.2 module noise(std=0.1)", bind={"adapter": adapter})
    assert inj.ops[0] is adapter
    handle = llama.model.layers[1].register_forward_hook(lambda _m, _a, out: adapter(out))  # noise: eval, none
    try:
        with torch.no_grad():
            want = llama(**ids_and_mask()).logits
    finally:
        handle.remove()
    assert torch.allclose(inj(**ids_and_mask()).logits, want, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph_equal_and_no_recompile_on_strength_change():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("gpt2", seed=5)
    spec = "at h.1 scale 0.5; at h.2[last] add v * 2; at h.3 capture c"
    bind = {"v": torch.randn(64)}
    compiled = garage.compile(model, spec, bind=bind, compile=True)
    eager = garage.compile(model, spec, bind=bind)
    inputs = ids_and_mask()
    with torch.no_grad():
        a = compiled(**inputs).logits
        assert torch.allclose(a, eager(**inputs).logits, atol=1e-5)
        assert torch.allclose(compiled.captures["c"], eager.captures["c"], atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        compiled.ops[0].factor.fill_(0.9)
        eager.ops[0].factor.fill_(0.9)
        b = compiled(**inputs).logits
    assert counters["stats"]["unique_graphs"] == graphs == 1
    assert torch.allclose(b, eager(**inputs).logits, atol=1e-5)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("setting, error", [("fast", "compile= names the mode 'fast'; torch.compile's modes are"),
                                            ({"mode": "turbo"}, "compile= names the mode 'turbo'"),
                                            (3, "compile= takes True, a mode name or a dict")])
def test_a_compile_setting_torch_does_not_know_is_refused_with_the_modes(llama, setting, error):
    with pytest.raises((ValueError, TypeError), match=re.escape(error)):
        garage.compile(llama, "at h.1 scale 0.5", compile=setting)


def test_a_str_naming_a_garage_file_is_read_as_a_file(tmp_path, llama, monkeypatch):
    (tmp_path / "s.garage").write_text("at h.1 scale 0.5\n")
    monkeypatch.chdir(tmp_path)
    from_str = garage.compile(llama, "s.garage")(**ids_and_mask()).logits
    assert torch.equal(from_str, garage.compile(llama, "at h.1 scale 0.5")(**ids_and_mask()).logits)


def test_a_capture_at_positions_keeps_only_those_positions(llama):
    inputs = ids_and_mask()
    inj = garage.compile(llama, "at h.1 capture all; at h.1[last] capture last")
    inj(**inputs)
    everything, last = inj.captures["all"], inj.captures["last"]
    assert torch.equal(last[:, -1], everything[:, -1]) and not last[:, :-1].any()


# Every op, at several sites and positions: deterministic in eval mode, so compiled, saved and eager agree.
EVERY_OP = """
at h.0 scale 0.9; at h.0 add v * 0.5; at h.0.mlp zero; at h.0.attn clamp -5 5
at h.1 ablate v; at h.1 module identity; at h.1 module layernorm; at h.1 module noise(std=0.1); at h.1 noise 0.2
at h.2 blade identity from v alpha 0.2; at h.2 blade gated from w project topk
at h.2 blade identity from w project linear; at h.2 blade gated; at h.2 blade gated from net alpha 0.3
at h.3 debate average views projection; at h.3 debate confidence views projection strength 0.2
at h.3 debate gated views dropout strength 0.3; at h.3[last] add v; at h.3[1:3] scale 1.1; at h.3 capture c
at h.1.mlp.hidden scale 1.2; at h.2.mlp.hidden[last] add u; at h.3.mlp.hidden ablate u; at h.3.mlp.hidden capture f
"""


@pytest.mark.slow
def test_every_op_compiles_as_one_graph_and_saves(tmp_path):
    model = tiny_model("llama", seed=6)
    torch.manual_seed(6)
    bind = {"v": torch.randn(64), "w": torch.randn(160), "net": torch.nn.Linear(64, 64), "u": torch.randn(128)}
    eager = garage.compile(model, EVERY_OP, bind=bind)
    compiled = garage.compile(model, EVERY_OP, bind=bind, compile=True)  # fullgraph: no graph breaks allowed
    compiled.load_state_dict(eager.state_dict())  # the same random projections and gates in both
    inputs = ids_and_mask()
    with torch.no_grad():
        want = eager(**inputs).logits
        assert torch.allclose(compiled(**inputs).logits, want, atol=1e-4)
    program = garage.load_artifact(eager.save(tmp_path / "every.pt2"))
    assert torch.allclose(program(**inputs), want, atol=1e-5)
