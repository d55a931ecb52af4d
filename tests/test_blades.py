"""Blades made from a source model: the recorded state, the metadata the checker reads, and the CLI."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_reference import on_output
from zoo import HIDDEN, tiny_model

import garage
from garage.cli import main
from garage.models import load_model_and_tokenizer

PROMPTS = ["two plus two is four", "the square of three is nine", "seven is a prime number"]
GATE = torch.sigmoid(torch.tensor(-2.0))  # where an untrained gate starts


@pytest.fixture(scope="module")
def source():
    return load_model_and_tokenizer("tiny:llama")  # 8 layers, hidden 128, a character tokenizer


def test_a_blade_is_the_mean_hidden_state_over_real_tokens_and_prompts(source, tmp_path):
    model, tokenizer = source
    blade = garage.blades.extract(model, tokenizer, PROMPTS, site="N-2", domain="math", path=tmp_path / "m.safetensors")
    rows = []
    for prompt in PROMPTS:  # one prompt at a time: no padding at all
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[6 + 1][0].mean(0))
    assert torch.allclose(blade.tensor, torch.stack(rows).mean(0), rtol=1e-5, atol=1e-3)  # states reach ~50
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["blade"] and torch.equal(f.get_tensor("blade"), blade.tensor)
    assert meta["kind"] == "blade" and meta["model_type"] == "llama" and meta["layer"] == "6"
    assert meta["depth"] == "0.7500" and meta["num_layers"] == "8" and meta["hidden_size"] == "128"
    assert meta["domain"] == "math" and meta["reduce"] == "mean" and meta["prompts"] == "3"
    assert meta["site_kind"] == "out" and len(meta["prompts_hash"]) == 16 and len(meta["config_hash"]) == 16


def test_last_takes_each_prompts_last_token(source):
    model, tokenizer = source
    blade = garage.blades.extract(model, tokenizer, PROMPTS[:2], site="h.3", reduce="last")
    rows = []
    for prompt in PROMPTS[:2]:
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[4][0, -1])
    assert torch.allclose(blade.tensor, torch.stack(rows).mean(0), rtol=1e-5, atol=1e-3)  # states reach ~50


def test_a_saved_blade_runs_at_the_research_defaults(source, tmp_path):
    """alpha 0.1 and a gate that starts at σ(−2): h ← h + 0.1 · σ(−2) · b."""
    model, tokenizer = source
    blade = garage.blades.extract(model, tokenizer, PROMPTS, site="h.6", path=tmp_path / "b.safetensors")
    target = load_model_and_tokenizer("tiny:llama", seed=1)[0]
    ids = tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"]
    inj = garage.compile(target, f'at h.6 blade gated from "{tmp_path / "b.safetensors"}"')
    handle = target.model.layers[6].register_forward_hook(on_output(lambda h: h + 0.1 * GATE * blade.tensor))
    with torch.no_grad():
        want = target(input_ids=ids).logits
        handle.remove()
        assert torch.allclose(inj(input_ids=ids).logits, want, atol=1e-5)


def test_the_checker_reads_where_a_blade_was_taken(source, tmp_path):
    model, tokenizer = source
    garage.blades.extract(model, tokenizer, PROMPTS, site="h.6", domain="math", path=tmp_path / "b.safetensors")
    other = load_model_and_tokenizer("tiny:llama", seed=1)[0]
    path = tmp_path / "b.safetensors"
    rules = lambda m, spec: {d.rule for d in garage.check(m, spec).warnings}  # noqa: E731
    assert "blade-self" in rules(model, f'at h.6 blade gated from "{path}"')
    assert "blade-self" not in rules(other, f'at h.6 blade gated from "{path}"')
    (warning,) = [d for d in garage.check(other, f'at h.2 blade gated from "{path}"').warnings if d.rule == "blade-depth"]
    assert "taken at depth 75% (h.6 of 8 blocks) but is added at depth 25% (h.2 of 8)" in warning.message
    assert "blade-depth" not in rules(other, f'at h.7 blade gated from "{path}"')  # one block away is close enough
    (error,) = garage.check(tiny_model("llama"), f'at h.2 blade gated from "{path}"').errors
    assert f"hidden size 128, but this model's is {HIDDEN}" in error.message


def test_blade_extract_and_info_on_the_command_line(tmp_path, capsys):
    prompts = tmp_path / "math.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "math.blade.safetensors"
    assert main(["blade", "extract", "--model", "tiny:llama", "--site", "N-2", "--domain", "math",
                 "--prompts", str(prompts), "-o", str(out)]) == 0
    assert f"{out}: [128] at h.6 of tiny:llama" in capsys.readouterr().out
    assert main(["blade", "info", str(out)]) == 0
    shown = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert shown["source"] == "tiny:llama" and shown["shape"] == "[128]" and shown["domain"] == "math"
    assert float(shown["norm"]) > 0
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["blade", "extract", "--model", "tiny:llama", "--prompts", str(empty), "-o", str(out)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert main(["blade", "info", str(tmp_path / "missing.safetensors")]) == 2
    assert main(["blade", "info", str(prompts)]) == 2
    assert "is not a safetensors file" in capsys.readouterr().err
