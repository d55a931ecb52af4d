"""Generation through injected graphs: the same tokens as model.generate with hooks, compiled without
recompiles, and saved artefacts that run in a fresh process with plain torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from test_reference import DOWN, PATHS
from test_reference import module as reference_module
from zoo import ARCH_NAMES, INTERMEDIATE, tiny_model

import garage
from garage.runtime.hooks import attach

DECODERS = [name for name in ARCH_NAMES if name != "bert"]
SPEC = (
    "at h.1 scale 1.5; at h.2.mlp[new] add v * 2; at h.0[last] clamp -0.5 0.5\n"
    "at h.1.attn[0:3] scale 0.5; at h.3[prompt] ablate v; at final[new] scale 1.2"
)
NEW = 30


def prompt(seed: int = 0, batch: int = 3, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask


def never_stopping(name: str):
    model = tiny_model(name)
    model.generation_config.eos_token_id = None  # 30 new tokens every time
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_tokens_equal_model_generate_with_hooks(name):
    model = never_stopping(name)
    ids, mask = prompt()
    injected = garage.compile(model, SPEC, bind={"v": torch.randn(64, generator=torch.Generator().manual_seed(1))})
    out = injected.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    with attach(model, [s.site for s in injected.plan], list(injected.ops)):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert out.shape == (3, 9 + NEW)
    assert torch.equal(out, expected)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(garage.compile(model, "").generate(ids, attention_mask=mask, max_new_tokens=NEW), plain)
    assert not torch.equal(out, plain)


def scaled_block(model, layer: int, factor: float):
    """The test's own hook: block `layer`'s output times `factor`."""
    def hook(_module, _args, out):
        return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor

    return model.model.layers[layer].register_forward_hook(hook)


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_p": 0.9}, {"top_k": 5, "repetition_penalty": 1.3}],
                         ids=["config-defaults", "temperature-top-p", "top-k-penalty"])
def test_sampled_tokens_equal_model_generate_from_one_seed(options):
    """One sampler on every path: unset options come from the generation config and transformers' defaults
    (top-k 50), and the draws follow model.generate's exactly, seed for seed."""
    model = never_stopping("llama")
    ids, mask = prompt(seed=5)
    injected, empty = garage.compile(model, "at h.1 scale 1.5"), garage.compile(model, "")
    for seed in (0, 1):
        torch.manual_seed(seed)
        got = injected.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, **options)
        handle = scaled_block(model, 1, 1.5)
        try:
            torch.manual_seed(seed)
            want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, **options)
        finally:
            handle.remove()
        assert torch.equal(got, want)
        torch.manual_seed(seed)
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, **options)
        torch.manual_seed(seed)
        assert torch.equal(empty.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, **options), plain)
        steered, baseline = garage.analyze.generations(empty, {"input_ids": ids, "attention_mask": mask}, seed=seed,
                                                       max_new_tokens=12, do_sample=True, **options)
        assert torch.equal(steered, baseline)  # `garage run --sample --compare`: one sampler on both sides
    assert not torch.equal(got, plain)


def test_new_positions_leave_the_prompt_alone():
    model = never_stopping("llama")
    ids, mask = prompt()
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    steered = garage.compile(model, "at h.1[new] scale -3").generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(steered[:, : 9 + 1], plain[:, : 9 + 1])  # the first new token comes from the prompt
    assert not torch.equal(steered, plain)


def test_sliding_window_models_decode_past_their_window():
    model = never_stopping("mistral")
    assert model.config.sliding_window < 9 + NEW
    ids, mask = prompt(seed=4)
    injected = garage.compile(model, "at h.2 scale 1.3")
    with attach(model, [s.site for s in injected.plan], list(injected.ops)):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(injected.generate(ids, attention_mask=mask, max_new_tokens=NEW), expected)


def test_eos_stops_rows_and_pads_them_like_hf():
    model = tiny_model("gpt2")
    ids, mask = prompt(seed=2)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = int(plain[1, 9 + 2])  # the third token of row 1 ends it
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = garage.compile(model, "").generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, expected)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = never_stopping("llama")
    ids, mask = prompt()
    injected = garage.compile(model, "at h.1 scale 1.1")
    greedy = injected.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(injected.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1), greedy)
    torch.manual_seed(7)
    a = injected.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9)
    torch.manual_seed(7)
    b = injected.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9)
    assert torch.equal(a, b) and a.shape == (3, 19)


def test_an_encoder_cannot_generate():
    with pytest.raises(TypeError, match="not a causal language model"):
        garage.compile(tiny_model("bert"), "").generate(torch.ones(1, 3, dtype=torch.long))


def saved_program_matches(injected, tmp_path, ids, mask) -> str:
    """Save the injected model as a .pt2 and run it in a fresh process that imports neither transformers
    nor garage: the logits must be equal. Returns the path."""
    path = injected.save(tmp_path / "steered.pt2")
    torch.save({"ids": ids, "mask": mask, "logits": injected(input_ids=ids, attention_mask=mask).logits},
               tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        program = torch.export.load({str(path)!r}).module()
        logits = program(input_ids=expected["ids"], attention_mask=expected["mask"])
        assert "transformers" not in sys.modules and "garage" not in sys.modules
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip() == "ok", result.stderr
    return path


def test_saved_program_runs_in_a_fresh_process_with_plain_torch(tmp_path):
    model = tiny_model("llama")
    injected = garage.compile(model, "at h.1 scale 0.5; at h.2[last] add v; at h.1.mlp blade gated from v",
                              bind={"v": torch.randn(64)})
    ids, mask = prompt()
    path = saved_program_matches(injected, tmp_path, ids, mask)
    assert torch.equal(garage.load_artifact(path)(input_ids=ids, attention_mask=mask),
                       injected(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_compiled_decoding_matches_eager_and_never_recompiles(mode):
    """Also the CUDA-graph mode, which on the CPU compiles the plain step over buffers kept between calls."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = never_stopping("llama")
    bind = {"v": torch.randn(64)}
    compiled = garage.compile(model, "at h.1 scale 1.5; at h.2[new] add v", bind=bind, compile=mode)
    eager = garage.compile(model, "at h.1 scale 1.5; at h.2[new] add v", bind=bind)
    one = torch.randint(3, 128, (1, 6))
    assert torch.equal(compiled.generate(one, max_new_tokens=NEW), eager.generate(one, max_new_tokens=NEW))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # one exported step graph, compiled for the prompt and for one token: nothing per step
    kept = [t.data_ptr() for t in compiled.backend._kv_buffers().kept]
    assert bool(kept) == (mode == "reduce-overhead")
    shorter = one[:, :4]  # a view with other strides: the compiled steps take it without recompiling
    assert torch.equal(compiled.generate(shorter, max_new_tokens=NEW + 3), eager.generate(shorter, max_new_tokens=NEW + 3))
    assert [t.data_ptr() for t in compiled.backend._kv_buffers().kept] == kept  # the same buffers, zeroed
    ids, mask = prompt(batch=4)
    compiled.ops[0].factor.fill_(1.2)
    eager.ops[0].factor.fill_(1.2)
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW),
                       eager.generate(ids, attention_mask=mask, max_new_tokens=NEW))
    # At most the prompt's, for batch 4 after batch 1. Before torch 2.13 the matmul decomposition specialises
    # batch 1 (a guard `input_ids.size()[0] == 1`), so the first larger batch compiles both steps once more.
    assert counters["stats"]["unique_graphs"] <= graphs + (1 if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 13) else 2)


@pytest.mark.slow
def test_aot_inductor_package_loads_and_matches(tmp_path):
    model = tiny_model("gpt2")
    injected = garage.compile(model, "at h.1 scale 0.5; at h.2[last] add v", bind={"v": torch.randn(64)})
    path = injected.package(tmp_path / "steered_aoti.pt2")
    ids, mask = prompt()
    compiled = garage.load_artifact(path, native=True)  # our own package: compiled code we built
    assert torch.allclose(compiled(input_ids=ids, attention_mask=mask), injected(input_ids=ids, attention_mask=mask).logits,
                          atol=1e-5)


@pytest.mark.parametrize("name", [n for n in DECODERS if DOWN[n] is not None])
def test_the_ffn_hidden_layer_steers_generation_like_a_hook(name):
    """`h.I.mlp.hidden[new]` during cached generation: the reference is a hook on the down projection's
    input (the table in test_reference.py), adding only on decode steps, which are the new tokens."""
    model = never_stopping(name)
    ids, mask = prompt()
    w = torch.randn(INTERMEDIATE, generator=torch.Generator().manual_seed(2))
    injected = garage.compile(model, "at h.1.mlp.hidden[new] add w * 2; at h.2.mlp.hidden scale 1.3", bind={"w": w})
    out = injected.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    blocks = PATHS[name][0]
    tokens = {}
    handles = [
        model.register_forward_pre_hook(lambda _m, a, k: tokens.update(n=k["input_ids"].shape[1]), with_kwargs=True),
        reference_module(model, f"{blocks}.1.{DOWN[name]}").register_forward_pre_hook(
            lambda _m, a: (a[0] + 2 * w,) if tokens["n"] == 1 else None),
        reference_module(model, f"{blocks}.2.{DOWN[name]}").register_forward_pre_hook(lambda _m, a: (a[0] * 1.3,)),
    ]
    try:
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(out, expected)
