"""Blades from a live source model (`blade … from model …`), fused into the target's graph.

The reference runs the two models separately: a forward hook on the source's block K (the test's own
module paths) records its output, and a forward hook on the target's block adds the blade with the test's
own formula, h + α · σ(W h + b) ⊙ P s. Generation is checked against a greedy loop without a cache that
runs both models on the whole sequence at every step."""

from __future__ import annotations

import re

import pytest
import torch
from test_generate import saved_program_matches
from test_reference import PATHS
from test_reference import module as reference_module
from zoo import tiny_model

import garage
from garage.fx.kinds import Unpadded
from garage.lang.diagnostics import SpecError, ValidationError

PAIRS = ["llama", "qwen2", "gpt2"]  # source and target of one architecture, with other weights


def _output(o):
    return o[0] if isinstance(o, tuple) else o


def _with_output(o, new):
    return (new, *o[1:]) if isinstance(o, tuple) else new


def reference_logits(target, source, name, layer, k, ids, mask, alpha, gate=None, proj=None, positions=None):
    """Both models run separately; the target's block `layer` gets α · g ⊙ P s, s the source's block k."""
    blocks = PATHS[name][0]
    seen = {}
    kwargs = {"attention_mask": mask} if positions is None else {"attention_mask": mask, "position_ids": positions}

    def add(_m, _a, o):
        h, s = _output(o), seen["s"]
        s = s if proj is None else s @ proj.T
        g = 1.0 if gate is None else torch.sigmoid(h @ gate[0].T + gate[1])
        return _with_output(o, h + alpha * g * s)

    record = reference_module(source, f"{blocks}.{k}").register_forward_hook(lambda _m, _a, o: seen.update(s=_output(o)))
    with torch.no_grad():
        source(input_ids=ids, **kwargs)
    record.remove()
    handle = reference_module(target, f"{blocks}.{layer}").register_forward_hook(add)
    try:
        with torch.no_grad():
            return target(input_ids=ids, **kwargs).logits
    finally:
        handle.remove()


def prompt(seed: int, batch: int = 3, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids, mask


def randomize(injected, seed: int) -> list[torch.Tensor]:
    """Random values for the op's parameters (the gate starts nearly closed and constant), returned."""
    g = torch.Generator().manual_seed(seed)
    params = list(injected.parameters())
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return params


@pytest.mark.parametrize("name", PAIRS)
def test_a_live_gated_blade_equals_the_two_model_reference(name):
    target, source = tiny_model(name, seed=0), tiny_model(name, seed=1)
    injected = garage.compile(target, "at h.2 blade gated from model src alpha 0.3", bind={"src": source})
    weight, bias = randomize(injected, 5)
    for seed in (0, 1):
        ids, mask = prompt(seed)
        got = injected(input_ids=ids, attention_mask=mask).logits
        want = reference_logits(target, source, name, 2, 2, ids, mask, 0.3, gate=(weight, bias))
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        assert not torch.allclose(got, target(input_ids=ids, attention_mask=mask).logits, atol=1e-3)
        full = torch.ones_like(mask)  # no padding: the unpadded graph, with the source spliced in too
        got = injected(input_ids=ids).logits
        want = reference_logits(target, source, name, 2, 2, ids, full, 0.3, gate=(weight, bias))
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (Unpadded() in injected.backend._graphs) == (name != "qwen2")  # qwen2 has sliding-window layers


def test_project_linear_brings_a_wider_source_to_the_target_width():
    target = tiny_model("llama", seed=0)
    source = tiny_model("llama", seed=1, hidden_size=96, intermediate_size=192)
    injected = garage.compile(target, "at h.1 blade identity from model src project linear alpha 0.2",
                              bind={"src": source})
    (proj,) = randomize(injected, 3)
    assert proj.shape == (64, 96)
    ids, mask = prompt(2)
    got = injected(input_ids=ids, attention_mask=mask).logits
    want = reference_logits(target, source, "llama", 1, 1, ids, mask, 0.2, proj=proj)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_the_source_layer_defaults_to_the_same_depth_and_layer_k_overrides_it():
    target, source = tiny_model("llama", seed=0), tiny_model("llama", seed=1, num_hidden_layers=8)
    ids, mask = prompt(3)
    for text, k in [("at h.2 blade identity from model src", 4), ("at h.2 blade identity from model src layer 6", 6)]:
        got = garage.compile(target, text, bind={"src": source})(input_ids=ids, attention_mask=mask).logits
        want = reference_logits(target, source, "llama", 2, k, ids, mask, 0.1)  # α defaults to 0.1
        assert torch.allclose(got, want, atol=1e-5), (text, (got - want).abs().max())


def _source_layers(graph_module) -> tuple[set[int], list[str]]:
    targets = [str(n.target) for n in graph_module.graph.nodes if n.op == "get_attr"
               and str(n.target).startswith("garage_source_")]
    return {int(m.group(1)) for t in targets if (m := re.search(r"\.layers\.(\d+)\.", t))}, targets


def test_only_the_source_layers_up_to_k_are_in_the_graph_and_its_weights_are_shared():
    target, source = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    injected = garage.compile(target, "at h.1 blade gated from model src", bind={"src": source})
    ids, mask = prompt(0)
    injected(input_ids=ids, attention_mask=mask)
    injected.generate(ids, attention_mask=mask, max_new_tokens=2)
    own = {p.data_ptr() for p in source.parameters()}
    for kind, rewritten in injected.backend._graphs.items():
        layers, targets = _source_layers(rewritten.graph_module)
        assert layers == {0, 1}, kind
        assert not [t for t in targets if "lm_head" in t or t.endswith("model.norm.weight")], kind
        tensors = [rewritten.graph_module.get_parameter(t) for t in targets if t.endswith("weight")]
        assert tensors and all(t.data_ptr() in own for t in tensors), kind  # the source's own tensors
    assert [n for n, _ in injected.named_parameters()] == ["ops.0.gate.weight", "ops.0.gate.bias"]


def never_stopping(name: str, seed: int):
    model = tiny_model(name, seed=seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def reference_generate(target, source, name, layer, ids, mask, alpha, new):
    """Greedy decoding without a cache: both models see the whole sequence at every step."""
    for _ in range(new):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = reference_logits(target, source, name, layer, layer, ids, mask, alpha, positions=positions)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], -1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
    return ids


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generation_keeps_a_cache_for_the_source_and_gives_the_reference_tokens(name):
    target, source = never_stopping(name, 0), never_stopping(name, 1)
    injected = garage.compile(target, "at h.2 blade identity from model src alpha 3", bind={"src": source})
    ids, mask = prompt(4)
    got = injected.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(got, reference_generate(target, source, name, 2, ids, mask, 3.0, 8))
    assert not torch.equal(got, target.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("text, bind, message", [
    ("at h.2 blade gated from model src", {"src": "other"}, "not a Hugging Face model"),
    ("at h.2 blade gated from model srx", {"src": None}, "'srx' is not bound"),
    ("at h.2 blade gated from model src layer 9", None, "layer 9 is out of range: the source model has 4 blocks"),
    ("at h.2[last] blade gated from model src", None, "acts at every token"),
    ("at final blade gated from model src", None, "goes at a block"),
    ("at h.2 blade gated from model wide", None, "width 96, but this model's hidden size is 64"),
    ("at h.2 blade gated from model wide project topk", None, "`project topk` needs indices"),
    ("at h.2 blade gated from model words", None, "vocabularies of 100 and 128 tokens"),
])
def test_bad_live_sources_are_refused_at_check_time_with_a_span(text, bind, message):
    target = tiny_model("llama", seed=0)
    models = {"src": tiny_model("llama", seed=1), "wide": tiny_model("llama", seed=1, hidden_size=96),
              "words": tiny_model("llama", seed=1, vocab_size=100)}
    report = garage.check(target, text, bind=bind if bind is not None else models)
    assert not report.ok and message in str(report), str(report)
    assert report.errors[0].line == 1 and report.errors[0].column > 1


def test_layer_without_a_model_source_is_a_syntax_error():
    with pytest.raises(SpecError, match="chooses a live source model's layer"):
        garage.parse('at h.2 blade gated from "b.safetensors" layer 2')


def test_tokenizers_with_other_vocabularies_are_refused(tmp_path):
    """Two folders with tokenizers of the same size that map tokens differently (`from model "folder"`)."""
    from garage.models import char_tokenizer

    target = tiny_model("llama", seed=0, vocab_size=100)
    target.save_pretrained(tmp_path / "target")
    char_tokenizer().save_pretrained(tmp_path / "target")
    source = tiny_model("llama", seed=1, vocab_size=100)
    source.save_pretrained(tmp_path / "source")
    tokenizer = char_tokenizer()
    vocab = tokenizer.get_vocab()
    shuffled = {tok: (i + 1) % len(vocab) for tok, i in vocab.items()}  # same size, other ids
    from tokenizers import Tokenizer, models

    tokenizer._tokenizer = Tokenizer(models.WordLevel(shuffled, unk_token="<unk>"))  # noqa: SLF001
    tokenizer.save_pretrained(tmp_path / "source")
    loaded = garage.models.load_model(str(tmp_path / "target"))
    report = garage.check(loaded, f'at h.2 blade gated from model "{tmp_path / "source"}"')
    assert "tokenizers with different vocabularies" in str(report), str(report)
    same = garage.check(loaded, f'at h.2 blade gated from model "{tmp_path / "target"}"')
    assert same.ok and "blade-self" in str(same)  # the very model: no capability gap


def test_hooks_refuse_a_live_source():
    with pytest.raises(ValidationError, match="runs in garage.compile only"):
        garage.hook(tiny_model("llama"), "at h.2 blade gated from model src", bind={"src": tiny_model("llama", seed=1)})


@pytest.mark.slow
def test_compiled_fullgraph_never_recompiles_and_the_saved_program_runs_without_garage(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    target, source = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    spec = "at h.2 blade gated from model src alpha 0.3"
    compiled = garage.compile(target, spec, bind={"src": source}, compile={"fullgraph": True})
    eager = garage.compile(target, spec, bind={"src": source})
    for seq in (9, 13):
        ids, mask = prompt(seq, seq=seq)
        with torch.no_grad():  # inference: with grad, the backward graph would be compiled too
            assert torch.allclose(compiled(input_ids=ids, attention_mask=mask).logits,
                                  eager(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    ids, mask = prompt(0)
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=4),
                       eager.generate(ids, attention_mask=mask, max_new_tokens=4))
    assert not counters["graph_break"]
    saved_program_matches(eager, tmp_path, ids, mask)
