"""Steering vectors from prompts: the difference of mean hidden states, checked against the model's own
`output_hidden_states`, saved with metadata that the checker reads."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from zoo import tiny_model

import garage
from garage.cli import main
from garage.models import char_tokenizer, load_model_and_tokenizer

POSITIVE = ["I love this, it is wonderful", "What a great day", "happy happy joy"]
NEGATIVE = ["I hate this", "What an awful, terrible day it was", "sad"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=3)


def reference_states(model, prompts: list[str], layer: int, last: bool = False) -> torch.Tensor:
    """Each prompt alone (no padding at all), its block-`layer` output as HF reports it."""
    tokenizer = char_tokenizer()
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        rows.append(h[-1] if last else h.mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("reduce", ["mean", "last"])
def test_contrast_is_the_difference_of_mean_states_with_padding_masked(llama, reduce):
    vector = garage.vectors.contrast(llama, char_tokenizer(), POSITIVE, NEGATIVE, site="h.2", reduce=reduce,
                                     batch_size=2)
    last = reduce == "last"
    want = reference_states(llama, POSITIVE, 2, last).mean(0) - reference_states(llama, NEGATIVE, 2, last).mean(0)
    assert vector.shape == (64,) and torch.allclose(vector, want, atol=1e-5)


def test_pairs_are_the_same_as_two_lists(llama):
    tokenizer = char_tokenizer()
    paired = garage.vectors.contrast(llama, tokenizer, list(zip(POSITIVE, NEGATIVE)), site="h.1")
    assert torch.allclose(paired, garage.vectors.contrast(llama, tokenizer, POSITIVE, NEGATIVE, site="h.1"))
    with pytest.raises(ValueError, match="one"):
        garage.vectors.contrast(llama, tokenizer, POSITIVE, NEGATIVE, site="h.*")


def test_a_saved_vector_steers_and_is_checked_against_its_use(llama, tmp_path):
    tokenizer = char_tokenizer()
    vector = garage.vectors.contrast(llama, tokenizer, POSITIVE, NEGATIVE, site="h.2")
    path = garage.vectors.save(tmp_path / "mood.safetensors", vector, **garage.vectors.metadata(llama, "h.2", 6, "mean"))
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("vector"), vector)
    assert meta["kind"] == "steering-vector" and meta["layer"] == "2" and meta["hidden_size"] == "64"
    assert meta["model_type"] == "llama" and meta["garage_version"] == garage.__version__

    ids = tokenizer(["so"], return_tensors="pt").input_ids
    handle = llama.model.layers[2].register_forward_hook(lambda _m, _a, out: out + 3.0 * vector)
    try:
        with torch.no_grad():
            want = llama(input_ids=ids).logits
    finally:
        handle.remove()
    assert torch.allclose(garage.compile(llama, f'at h.2 add "{path}" * 3')(input_ids=ids).logits, want, atol=1e-5)
    assert garage.check(llama, f'at h.2 add "{path}"').diagnostics == []

    (warning,) = garage.check(llama, f'at h.1 add "{path}"').warnings
    assert warning.rule == "vector-layer" and "made at layer 2" in warning.message
    other = tiny_model("gpt2")
    assert {w.rule for w in garage.check(other, f'at h.2 add "{path}"').warnings} == {"vector-model"}
    wide = tiny_model("llama", hidden_size=96, intermediate_size=192, head_dim=24)
    (error,) = garage.check(wide, f'at h.2 add "{path}"').errors
    assert "hidden size 64" in error.message and error.column == 12


def test_the_vector_command_writes_a_file(tmp_path, capsys):
    out = tmp_path / "v.safetensors"
    pos = tmp_path / "pos.txt"
    pos.write_text("\n".join(POSITIVE[1:]) + "\n")
    argv = ["vector", "--model", "tiny:llama", "--site", "N-4", "--pos", POSITIVE[0], "--pos-file", str(pos),
            "--neg", NEGATIVE[0], "--neg", NEGATIVE[1], "-o", str(out)]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    model, tokenizer = load_model_and_tokenizer("tiny:llama")
    want = garage.vectors.contrast(model, tokenizer, POSITIVE, NEGATIVE[:2], site="h.4")
    with safe_open(str(out), framework="pt") as f:
        assert torch.allclose(f.get_tensor("vector"), want, atol=1e-6)
        assert f.metadata()["site"] == "h.4" and f.metadata()["prompts"] == "5"
    assert main(["vector", "--model", "tiny:llama", "--pos", "x", "-o", str(out)]) == 2
