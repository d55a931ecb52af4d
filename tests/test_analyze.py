"""Capture by site name, per-layer statistics, and the per-layer effect of a spec."""

import pytest
import torch

from garage import analyze
from garage.models import load_model_and_tokenizer as load


@pytest.fixture(scope="module")
def gpt2():
    model, tokenizer = load("tiny:gpt2")
    inputs = dict(tokenizer(["The meaning of life is", "Hi"], return_tensors="pt", padding=True))
    return model, inputs


def test_capture_by_site_name(gpt2):
    model, inputs = gpt2
    states = analyze.capture(model, ["h.0", "h.3.mlp", "final", "h.{1, 2}"], inputs)
    assert list(states) == ["h.0", "h.3.mlp", "final", "h.1", "h.2"]
    assert all(t.shape == (2, 22, 128) for t in states.values())
    expected = model(**inputs, output_hidden_states=True).hidden_states
    assert torch.equal(states["h.0"], expected[1]) and torch.equal(states["h.2"], expected[3])


def test_layer_stats_keys_and_values(gpt2):
    model, inputs = gpt2
    h = analyze.capture(model, "h.5", inputs)["h.5"]
    stats = analyze.layer_stats(h, inputs["attention_mask"])
    assert set(stats) == {"mean", "std", "min", "max", "sparsity", "entropy"}
    real = h[inputs["attention_mask"].bool()]
    assert stats["max"] == pytest.approx(real.max().item()) and stats["min"] == pytest.approx(real.min().item())
    assert 0 < stats["entropy"] <= torch.log(torch.tensor(128.0)).item() + 1e-5
    assert analyze.layer_stats(torch.zeros(1, 2, 4))["sparsity"] == 1.0


def test_compare_shows_where_a_spec_acts(gpt2):
    model, inputs = gpt2
    effects = analyze.compare(model, "at h.6 scale 0.5", inputs)
    assert [e.site for e in effects] == [f"h.{i}" for i in range(12)] + ["final"]
    before = [e for e in effects if e.site in ("h.0", "h.5")]
    assert all(e.cosine == pytest.approx(1.0) and e.l2 == 0 for e in before)
    at = next(e for e in effects if e.site == "h.6")
    assert at.cosine == pytest.approx(1.0, abs=1e-6) and at.l2 > 0  # scaling keeps the direction
    assert effects[-2].cosine < 0.999
    table = analyze.effect_table(effects)
    assert table.splitlines()[0].split() == ["site", "cosine", "L2", "change"] and "█" in table


def test_compare_reads_files_beside_the_spec(gpt2, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    model, inputs = gpt2
    save_file({"v": torch.randn(128)}, str(tmp_path / "steer.safetensors"))
    (tmp_path / "s.garage").write_text('at h.3 add "steer.safetensors"\n')
    monkeypatch.chdir(tmp_path.parent)  # the file is found beside the spec, not in the working folder
    effects = analyze.compare(model, tmp_path / "s.garage", inputs)
    assert next(e for e in effects if e.site == "h.3").l2 > 0


def test_capture_names_a_bad_site_clearly(gpt2):
    import garage

    model, inputs = gpt2
    with pytest.raises(garage.ResolveError, match="layer 40 is out of range"):
        analyze.capture(model, "h.40", inputs)


def test_the_ffn_hidden_layer_can_be_captured_and_compared(gpt2):
    model, inputs = gpt2
    seen = []
    handle = model.transformer.h[2].mlp.c_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        states = analyze.capture(model, "h.2.mlp.hidden", inputs)
    finally:
        handle.remove()
    assert torch.equal(states["h.2.mlp.hidden"], seen[0]) and seen[0].shape == (2, 22, 512)
    effects = analyze.compare(model, "at h.3.mlp.hidden zero", inputs, sites=["h.*.mlp.hidden"])
    assert [e.site for e in effects] == [f"h.{i}.mlp.hidden" for i in range(12)]
    assert [e.cosine == pytest.approx(1.0) for e in effects[:3]] == [True] * 3 and effects[3].l2 > 0
    assert "h.11.mlp.hidden" in analyze.effect_table(effects).splitlines()[-1]


def test_the_seeds_capture_object(gpt2):
    """`with capture(model, layers=[0, 6, 11]) as snap: model(ids)`, checked against output_hidden_states."""
    model, inputs = gpt2
    with analyze.capture(model, layers=[0, 6, 11]) as snap:
        model(**inputs)
    expected = model(**inputs, output_hidden_states=True).hidden_states
    assert len(snap) == 3 and torch.equal(snap[6], expected[7]) and torch.equal(snap["h.0"], expected[1])
    stats = snap.stats()
    h = expected[7].float()
    assert stats["h.6"]["mean"] == pytest.approx(h.mean().item(), rel=1e-5)
    assert stats["h.6"]["std"] == pytest.approx(h.std().item(), rel=1e-5)
    table = snap.table().splitlines()
    assert table[0].split() == ["site", "mean", "std", "sparsity", "entropy"] and len(table) == 4
    model(**inputs)  # after the block: nothing is recorded any more
    assert torch.equal(snap[6], expected[7])
    with pytest.raises(KeyError, match="'h.5' was not captured"):
        snap["h.5"]


def test_compare_models_says_what_can_pass():
    gpt2, llama = load("tiny:gpt2")[0], load("tiny:llama")[0]
    wide = load("tiny:llama")[0]
    comparison = analyze.compare_models(gpt2, llama)
    facts = {what: (a, b) for what, a, b in comparison.facts}
    assert facts["blocks"] == ("12", "8") and facts["hidden size"] == ("128", "128")
    assert facts["tokenizer vocab hash"][0] == facts["tokenizer vocab hash"][1]
    verdicts = dict(comparison.verdicts)
    assert verdicts["blade files pass (same hidden size)"] == "yes" and verdicts["live source (same tokenizer)"] == "yes"
    assert verdicts["blocks swappable"] == "no: type, FFN width differ"
    assert dict(analyze.compare_models(llama, wide).verdicts)["blocks swappable"] == "yes"
