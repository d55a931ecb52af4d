"""Conditions (`… when SITE @ v > F [soft T]`) against references written here.

The reference runs each row alone, unpadded, with this file's own hooks at module paths of its own: one
keeps block 2's output and decides the row's gate (mean over tokens of cos with v, against F), the other
adds the steering vector at block 4's output if the gate is open. In generation the decision is made on
the prompt's forward and kept for the new tokens.
"""

from __future__ import annotations

import pytest
import torch

import garage
from garage.conditions import best_threshold, calibrate
from garage.models import load_model_and_tokenizer

PROMPTS = ["hello world", "abc", "the quick brown fox jumps", "zzz yyy", "a cat sat on the mat", "0123456789"]


@pytest.fixture(scope="module")
def llama():
    model, tokenizer = load_model_and_tokenizer("tiny:llama")
    g = torch.Generator().manual_seed(11)
    return model, tokenizer, torch.randn(128, generator=g), torch.randn(128, generator=g)


def row_value(model, ids, v, layer: int = 2) -> float:
    kept = []
    handle = model.model.layers[layer].register_forward_hook(lambda _m, _a, out: kept.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    h = kept[0][0]
    return float((h @ v / (h.norm(dim=-1) * v.norm())).mean())


def gate_of(value: float, threshold: float, soft: float | None) -> float:
    if soft is None:
        return float(value > threshold)
    return float(torch.sigmoid(torch.tensor((value - threshold) / soft)))


def steered_row(model, ids, steer, factor, v, threshold, soft, new_tokens=0):
    """One row alone: logits (or greedy tokens) with steer·factor·g added at block 4, g decided on the prompt."""
    state: dict[str, float] = {}

    def decide(_m, _a, out):
        if "g" not in state:  # the first forward is the prompt's
            h = (out[0] if isinstance(out, tuple) else out)[0]
            state["g"] = gate_of(float((h @ v / (h.norm(dim=-1) * v.norm())).mean()), threshold, soft)

    def add(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + state["g"] * factor * steer
        return (h, *out[1:]) if isinstance(out, tuple) else h
    handles = [model.model.layers[2].register_forward_hook(decide), model.model.layers[4].register_forward_hook(add)]
    try:
        with torch.no_grad():
            if new_tokens:
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0)
            return model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()


def threshold_between(model, tokenizer, v) -> float:
    """A threshold that some rows pass and some do not: the median of their values (this file's own)."""
    values = sorted(row_value(model, tokenizer(p, return_tensors="pt")["input_ids"], v) for p in PROMPTS)
    return (values[2] + values[3]) / 2


@pytest.mark.parametrize("soft", [None, 0.02])
def test_each_row_decides_for_itself_as_if_alone(llama, soft):
    model, tokenizer, v, steer = llama
    threshold = threshold_between(model, tokenizer, v)
    clause = f"when h.2 @ v > {threshold!r}" + (f" soft {soft}" if soft else "")
    inj = garage.compile(model, f"at h.4 add s * 3 {clause}", bind={"v": v, "s": steer})
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # left padding
    with torch.no_grad():
        got = inj(**batch).logits
    gates = []
    for r, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        want = steered_row(model, ids, steer, 3.0, v, threshold, soft)[0]
        real = batch["attention_mask"][r].bool()
        assert torch.allclose(got[r][real], want, atol=1e-4, rtol=1e-4), prompt
        gates.append(gate_of(row_value(model, ids, v), threshold, soft))
    assert 0 < sum(g > 0.5 for g in gates) < len(PROMPTS)  # the batch holds rows of both kinds


def test_in_generation_the_prompt_decides_for_the_new_tokens(llama):
    model, tokenizer, v, steer = llama
    threshold = threshold_between(model, tokenizer, v)
    inj = garage.compile(model, f"at h.4 add s * 4 when h.2 @ v > {threshold!r}", bind={"v": v, "s": steer})
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    got = inj.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6)
    width = batch["input_ids"].shape[1]
    for r, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        want = steered_row(model, ids, steer, 4.0, v, threshold, None, new_tokens=6)[0, ids.shape[1]:]
        new = got[r, width:].tolist()
        assert new[:len(want)] == want.tolist(), prompt  # the reference stops at EOS; garage pads the rest
        assert all(t == tokenizer.pad_token_id for t in new[len(want):]), prompt


def test_a_condition_is_checked_against_the_model(llama):
    model, _, v, steer = llama
    bind = {"v": v, "s": steer, "w": torch.randn(64)}
    cases = {  # spec → (message, the column it points at)
        "at h.2 add s when h.4 @ v > 0": ("which the model computes after h.2", 19),
        "at h.4 add s when h.2 @ w > 0": ("has 64 values [64] but this model's hidden size is 128", 25),
        "at h.4 capture c when h.2 @ v > 0": ("`capture` takes no condition", 18),
        "at h.4 add s when h.* @ v > 0": ("a condition reads one site", 19),
        "at h.4 add s when h.2.mlp.hidden @ v > 0": ("a condition reads one site", 19),
    }
    for spec, (message, column) in cases.items():
        (error,) = garage.check(model, spec, bind=bind).errors
        assert message in error.message and error.column == column, (spec, error.column, error.message)
    with pytest.raises(garage.GarageError, match="garage.compile only"):
        garage.hook(model, "at h.4 add s when h.2 @ v > 0", bind=bind)
    assert garage.check(model, "at h.2.mlp scale 0 when h.2.attn @ v < 0.1 soft 0.5", bind=bind).ok


def test_calibration_finds_the_threshold_this_file_finds(llama):
    model, tokenizer, v, _ = llama
    passing, failing = PROMPTS[:3], PROMPTS[3:]
    rows = calibrate(model, tokenizer, passing, failing, v, sites="h.{1, 2}")
    assert [r.site for r in sorted(rows, key=lambda r: r.site)] == ["h.1", "h.2"]
    for row in rows:
        layer = int(row.site[2:])
        values = [row_value(model, tokenizer(p, return_tensors="pt")["input_ids"], v, layer) for p in PROMPTS]
        # this file's own search: the best accuracy over every split point, either direction
        best = 0.0
        for t in sorted(values):
            for sign in (1, -1):
                right = sum((sign * (x - t) > 0) == (i < 3) for i, x in enumerate(values)) / len(values)
                best = max(best, right)
        assert row.accuracy == pytest.approx(best)
        passes = [(x > row.threshold) if row.compare == ">" else (x < row.threshold) for x in values]
        assert sum(p == (i < 3) for i, p in enumerate(passes)) / len(values) == pytest.approx(row.accuracy)


def test_best_threshold_separates_separable_sets():
    compare, threshold, accuracy = best_threshold(torch.tensor([0.5, 0.7]), torch.tensor([0.1, 0.2, 0.3]))
    assert (compare, accuracy) == (">", 1.0) and 0.3 < threshold < 0.5
    compare, _, accuracy = best_threshold(torch.tensor([-1.0]), torch.tensor([1.0, 2.0]))
    assert (compare, accuracy) == ("<", 1.0)


@pytest.mark.slow
def test_conditions_compile_with_fullgraph(llama):
    model, tokenizer, v, steer = llama
    threshold = threshold_between(model, tokenizer, v)
    spec = f"at h.4 add s * 3 when h.2 @ v > {threshold!r}"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    eager = garage.compile(model, spec, bind={"v": v, "s": steer})
    fast = garage.compile(model, spec, bind={"v": v, "s": steer}, compile={"fullgraph": True})
    with torch.no_grad():
        assert torch.allclose(fast(**batch).logits, eager(**batch).logits, atol=1e-4)
    want = eager.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4)
    assert torch.equal(fast.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4), want)
