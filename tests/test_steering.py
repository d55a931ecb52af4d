"""Steering curves (`garage.analyze.strength_sweep`, `garage sweep`) against measurements written here.

The reference steers the eager model with this file's own forward hook (h + c·v at block 2's output, by
its module path), and computes the word gap, the perplexity and the KL with its own formulas.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from garage.analyze import strength_sweep
from garage.cli import main
from garage.models import load_model_and_tokenizer
from garage.steering import coefficient_range

PROMPTS = ["the cat sat on", "we went to", "a big red"]
NEUTRAL = ["hello there", "one two three four"]
TEXT = "it was a quiet day by the sea, and the boats came in slowly."


@pytest.fixture(scope="module")
def llama():
    return load_model_and_tokenizer("tiny:llama")


def left_padded(tokenizer, texts):
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([[pad] * (width - len(i)) + i for i in ids]),
            "attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])}


def steered_logits(model, batch, vector, c):
    handle = model.model.layers[2].register_forward_hook(lambda _m, _a, out: (out[0] + c * vector, *out[1:])
                                                         if isinstance(out, tuple) else out + c * vector)
    try:
        with torch.no_grad():
            return model(**batch).logits.float()
    finally:
        handle.remove()


def reference(model, tokenizer, vector, c):
    """(word gap, perplexity, KL) at coefficient c, by this file's own formulas."""
    good, bad = tokenizer.convert_tokens_to_ids("h"), tokenizer.convert_tokens_to_ids("s")  # " happy", " sad"
    logits = steered_logits(model, left_padded(tokenizer, PROMPTS), vector, c)[:, -1].log_softmax(-1)
    gap = float((logits[:, good] - logits[:, bad]).mean())
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    text = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    logp = steered_logits(model, text, vector, c)[0, :-1].log_softmax(-1)
    ppl = math.exp(float(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()))
    neutral = left_padded(tokenizer, NEUTRAL)
    p, q = (steered_logits(model, neutral, vector, k).log_softmax(-1) for k in (0.0, c))
    kl = (p.exp() * (p - q)).sum(-1)[neutral["attention_mask"].bool()].mean()
    return gap, ppl, float(kl)


def test_each_coefficient_equals_the_hooked_reference(llama):
    model, tokenizer = llama
    vector = torch.randn(128, generator=torch.Generator().manual_seed(4))
    before = vector.clone()
    sweep = strength_sweep(model, "at h.2 add v * 1.5", [-2.0, 0.0, 3.0], tokenizer=tokenizer, bind={"v": vector},
                           good=["happy"], bad=["sad"], prompts=PROMPTS, text=TEXT, neutral=NEUTRAL)
    assert sweep.statement == "1:1 add (factor)" and sweep.coefficients == [-2.0, 0.0, 3.0]
    for i, c in enumerate(sweep.coefficients):
        gap, ppl, kl = reference(model, tokenizer, vector, c)
        assert sweep.effect[i] == pytest.approx(gap, abs=1e-4), c
        assert sweep.perplexity[i] == pytest.approx(ppl, rel=1e-4), c
        assert sweep.kl[i] == pytest.approx(kl, abs=1e-5), c
    assert sweep.kl[1] == 0.0 and sweep.effect[0] != sweep.effect[2]
    assert torch.equal(vector, before)


def test_the_swept_statement_is_chosen_by_line(llama):
    model, tokenizer = llama
    spec = "at h.1 scale 0.9\nat h.*.mlp scale 1.0"
    with pytest.raises(ValueError, match="2 statements with a strength"):
        strength_sweep(model, spec, [1.0], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="line 3 has no statement with a strength"):
        strength_sweep(model, spec, [1.0], tokenizer=tokenizer, statement=3)
    sweep = strength_sweep(model, spec, [1.0, 0.5], tokenizer=tokenizer, statement=2, neutral=NEUTRAL)
    assert sweep.statement == "2:1 scale (factor)" and sweep.kl[0] > 0  # h.1 stays at 0.9 throughout


def test_coefficient_ranges():
    assert coefficient_range("-2..2:1") == [-2, -1, 0, 1, 2]
    assert coefficient_range("0..1:0.25") == [0, 0.25, 0.5, 0.75, 1]
    assert coefficient_range("-4,0,4") == [-4, 0, 4]
    for bad in ("2..1:1", "0..1:0", "a..b"):
        with pytest.raises(ValueError, match="coefficients"):
            coefficient_range(bad)


def test_garage_sweep_writes_the_curves_and_json_equals_the_api(tmp_path, capsys, llama):
    pytest.importorskip("matplotlib")
    spec = tmp_path / "s.garage"
    spec.write_text("at h.3 scale 1.0\n")
    argv = ["sweep", str(spec), "--model", "tiny:llama", "--coefficients", "0.5..1.5:0.5"]
    assert main([*argv, "-o", str(tmp_path / "curve.png")]) == 0
    assert "perplexity" in capsys.readouterr().out
    data = (tmp_path / "curve.png").read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (700, 600)
    assert main([*argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model, tokenizer = llama
    want = strength_sweep(model, "at h.3 scale 1.0", [0.5, 1.0, 1.5], tokenizer=tokenizer)
    assert got["coefficients"] == want.coefficients and got["kl"] == pytest.approx(want.kl, abs=1e-6)
    assert got["effect"] == pytest.approx(want.effect, abs=1e-6) and got["kl"][1] == 0.0
