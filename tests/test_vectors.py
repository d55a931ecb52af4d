"""Steering vectors from prompts: the difference of mean hidden states, checked against the model's own
`output_hidden_states`, saved with metadata that the checker reads; the PCA and probe methods, checked
against numpy written here."""

from __future__ import annotations

import numpy as np
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
    assert meta["method"] == "mean"

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
        assert f.metadata()["method"] == "mean"
    assert main(["vector", "--model", "tiny:llama", "--pos", "x", "-o", str(out)]) == 2


# --- methods: pca_diff, pca_center, probe -------------------------------------------------------------

PAIRS = [("I love this, it is wonderful", "I hate this, it is awful"), ("What a great day", "What a bad day"),
         ("happy happy joy", "sad sad gloom"), ("The food was delicious", "The food was disgusting"),
         ("She smiled at me", "She glared at me"), ("best movie ever!", "worst movie ever!")]


def hooked_states(model, prompts: list[str], layer: int) -> np.ndarray:
    """Each prompt alone, block `layer`'s output read by a forward hook, averaged over its tokens."""
    tokenizer, seen = char_tokenizer(), []
    handle = model.model.layers[layer].register_forward_hook(
        lambda _m, _a, out: seen.append((out[0] if isinstance(out, tuple) else out)[0].mean(0)))
    try:
        for prompt in prompts:
            with torch.no_grad():
                model(input_ids=tokenizer(prompt, return_tensors="pt").input_ids)
    finally:
        handle.remove()
    return torch.stack(seen).double().numpy()


def along(unit: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """The unit direction, signed so positives project higher, times the mean difference's part along it."""
    gap = pos.mean(0) - neg.mean(0)
    unit = unit if unit @ gap >= 0 else -unit
    return unit * (unit @ gap)


def first_pc(rows: np.ndarray) -> np.ndarray:
    return np.linalg.svd(rows - rows.mean(0), full_matrices=False)[2][0]  # sklearn's PCA centres


def numpy_probe(pos: np.ndarray, neg: np.ndarray, penalty: float = 1e-2) -> np.ndarray:
    """Logistic regression in all dimensions (not centred; intercept free): mean log-loss + penalty/2 ‖w‖², on
    the states over their RMS about their mean, by plain Newton; its gradient is checked to be zero."""
    x = np.vstack([pos, neg])
    x = x / np.sqrt(((x - x.mean(0)) ** 2).mean())
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    a = np.hstack([x, np.ones((len(x), 1))])
    ridge = np.r_[np.full(x.shape[1], penalty), 0.0]
    theta = np.zeros(a.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-a @ theta))
        grad = a.T @ (p - y) / len(y) + ridge * theta
        theta -= np.linalg.solve((a.T * (p * (1 - p))) @ a / len(y) + np.diag(ridge), grad)
    p = 1 / (1 + np.exp(-a @ theta))
    assert np.abs(a.T @ (p - y) / len(y) + ridge * theta).max() < 1e-12
    return theta[:-1] / np.linalg.norm(theta[:-1])


def reference(method: str, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    if method == "mean":
        return pos.mean(0) - neg.mean(0)
    if method == "pca_diff":
        return along(first_pc(pos - neg), pos, neg)
    if method == "pca_center":
        centre = (pos + neg) / 2
        return along(first_pc(np.vstack([pos - centre, neg - centre])), pos, neg)
    return along(numpy_probe(pos, neg), pos, neg)


@pytest.mark.parametrize("method", ["mean", "pca_diff", "pca_center", "probe"])
def test_each_method_matches_numpy_on_the_models_states(llama, method):
    pos, neg = [p for p, _ in PAIRS], [n for _, n in PAIRS]
    vector = garage.vectors.contrast(llama, char_tokenizer(), PAIRS, site="h.2", method=method, batch_size=4)
    want = reference(method, hooked_states(llama, pos, 2), hooked_states(llama, neg, 2))
    got = vector.double().numpy()
    assert vector.shape == (64,) and vector.dtype == torch.float32
    assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) > 1 - 1e-6  # float32 states: ~1e-13 off
    assert np.isclose(np.linalg.norm(got), np.linalg.norm(want), rtol=1e-4)


def clusters(seed: int = 0, n: int = 40, hidden: int = 16):
    """Pairs that differ along axis 0 by amounts from 1 to 5, and share a 10× larger spread along axis 1
    (their topic, say) and a little along every axis; plus a little noise of each state's own."""
    g = torch.Generator().manual_seed(seed)
    axis, nuisance = torch.eye(hidden, dtype=torch.float64)[:2]
    shared = (10 * torch.randn(n, 1, generator=g, dtype=torch.float64) * nuisance
              + 0.5 * torch.randn(n, hidden, generator=g, dtype=torch.float64))
    apart = 1 + 4 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(2, n, hidden, generator=g, dtype=torch.float64)
    return shared + apart / 2 * axis + noise[0], shared - apart / 2 * axis + noise[1], axis, nuisance


@pytest.mark.parametrize("method", ["pca_diff", "pca_center", "probe"])
def test_the_methods_find_the_axis_that_splits_pairs_not_the_larger_spread(method):
    pos, neg, axis, nuisance = clusters()
    states = torch.cat([pos, neg])
    assert abs(torch.linalg.svd(states - states.mean(0)).Vh[0] @ nuisance) > 0.99  # plain PCA finds the spread
    vector = garage.vectors.from_states(pos, neg, method)
    assert vector.dtype == torch.float64 and vector @ axis / vector.norm() > 0.98  # sign-correct
    gap = pos.mean(0) - neg.mean(0)
    unit = vector / vector.norm()
    assert torch.allclose(vector, unit * (unit @ gap)) and vector @ gap > 0  # the mean difference along it
    assert torch.allclose(garage.vectors.from_states(neg, pos, method), -vector)


def test_mean_is_the_difference_of_the_means_exactly():
    pos, neg, _, _ = clusters(seed=1)
    assert torch.equal(garage.vectors.from_states(pos, neg, "mean"), pos.mean(0) - neg.mean(0))
    assert torch.equal(garage.vectors.from_states(neg, pos, "mean"), neg.mean(0) - pos.mean(0))


def test_unpaired_prompts_and_unknown_methods_are_refused(llama):
    pos, neg, _, _ = clusters()
    tokenizer = char_tokenizer()
    for method in ("pca_diff", "pca_center"):
        with pytest.raises(ValueError, match=f"{method} pairs positive i with negative i.*not 40 and 39"):
            garage.vectors.from_states(pos, neg[:-1], method)
        with pytest.raises(ValueError, match="not 3 and 2"):
            garage.vectors.contrast(llama, tokenizer, POSITIVE, NEGATIVE[:2], site="h.2", method=method)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        garage.vectors.from_states(pos[:1], neg[:1], "pca_diff")
    assert garage.vectors.from_states(pos, neg[:-1], "probe").shape == (16,)  # the probe needs no pairs
    choices = "mean, pca_diff, pca_center, probe, not 'pca'"
    with pytest.raises(ValueError, match=choices):
        garage.vectors.contrast(llama, tokenizer, POSITIVE, NEGATIVE, site="h.2", method="pca")
    with pytest.raises(ValueError, match=choices):
        garage.vectors.metadata(llama, "h.2", 6, "mean", "pca")


def test_the_vector_command_records_its_method(tmp_path, capsys):
    out = tmp_path / "v.safetensors"
    argv = ["vector", "--model", "tiny:llama", "--site", "h.2", "--method", "pca_diff", "-o", str(out)]
    for pos, neg in PAIRS:
        argv += ["--pos", pos, "--neg", neg]
    assert main(argv) == 0
    assert "by pca_diff" in capsys.readouterr().out
    model, tokenizer = load_model_and_tokenizer("tiny:llama")
    want = garage.vectors.contrast(model, tokenizer, PAIRS, site="h.2", method="pca_diff")
    with safe_open(str(out), framework="pt") as f:
        assert torch.allclose(f.get_tensor("vector"), want, atol=1e-6)
        assert f.metadata()["method"] == "pca_diff" and f.metadata()["prompts"] == "12"
    assert main([*argv, "--neg", "one too many"]) == 2
    assert "not 6 and 7" in capsys.readouterr().err
