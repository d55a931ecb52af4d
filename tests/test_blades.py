"""Blades made from a source model: the recorded state, the metadata the checker reads, and the CLI."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_reference import batch, close, on_output, out_of, reference
from zoo import HIDDEN, tiny_model

import garage
from garage.cli import main
from garage.models import load_model_and_tokenizer
from garage.runtime.hooks import attach

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
    assert "unsupported file type '.txt'" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a header at all")
    assert main(["blade", "info", str(junk)]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err


# ------------------------------------------------------------------ sequence blades
def test_a_sequence_blade_averages_each_position_over_the_prompts_that_reach_it(source):
    model, tokenizer = source
    blade = garage.blades.extract(model, tokenizer, PROMPTS, site="h.5", reduce="sequence")
    states = []
    for prompt in PROMPTS:
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[6][0])
    longest = max(len(s) for s in states)
    assert blade.tensor.shape == (longest, 128) and blade.metadata["reduce"] == "sequence"
    for p in (0, len(states[0]) - 1, longest - 1):
        want = torch.stack([s[p] for s in states if len(s) > p]).mean(0)
        assert torch.allclose(blade.tensor[p], want, rtol=1e-5, atol=1e-3), p


def rows_at_positions(seq: torch.Tensor, mask: torch.Tensor, alpha: float):
    """h + α·seq[p] at absolute position p (counted from the first real token); nothing past seq's end."""
    def apply(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        position = mask.cumsum(-1) - 1
        for b in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                p = int(position[b, t])
                if mask[b, t] and p < len(seq):
                    out[b, t] += alpha * seq[p]
        return out
    return apply


def test_a_sequence_blade_adds_row_p_at_position_p_and_nothing_past_its_end():
    model = tiny_model("llama")
    seq = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    for seed in (0, 1):
        inputs = batch(seed)
        spec = "at h.2 blade identity from s alpha 0.7"
        inj = garage.compile(model, spec, bind={"s": seq})
        want = reference(model, inputs, "model.layers.2", rows_at_positions(seq, inputs["attention_mask"], 0.7))
        hooks, _ = garage.hook(model, spec, bind={"s": seq})  # attached from here on
        with torch.no_grad():
            got = out_of(inj(**inputs))
            with hooks:
                hooked = out_of(model(**inputs))
        assert close(got, want) and close(hooked, want), seed


def test_generation_with_a_sequence_blade_follows_the_same_rule():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    seq = torch.randn(12, HIDDEN, generator=torch.Generator().manual_seed(4))  # reaches into the new tokens
    inputs = batch(2)
    injected = garage.compile(model, "at h.1 blade identity from s alpha 2", bind={"s": seq})
    out = injected.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=8)
    with attach(model, [s.site for s in injected.plan], list(injected.ops)):
        expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, expected)


def test_the_checker_accepts_exactly_the_blade_shapes_that_run():
    model = tiny_model("llama")
    for shape in [(HIDDEN,), (1, HIDDEN), (7, HIDDEN), (1, 7, HIDDEN)]:
        assert not garage.check(model, "at h.1 blade gated from b", bind={"b": torch.randn(shape)}).errors, shape
    (error,) = garage.check(model, "at h.1 blade gated from b", bind={"b": torch.randn(2, 7, HIDDEN)}).errors
    assert "a blade is one vector [hidden] or one sequence [length, hidden]" in error.message and error.column == 25
    (error,) = garage.check(model, "at h.1.attn.heads blade gated from b", bind={"b": torch.randn(7, 16)}).errors
    assert "a sequence blade cannot be added at attention heads" in error.message


CALIBRATION = ["one two three four", "a b c d e f g", "the cat sat on the mat", "x = y + z"]


def test_project_topk_keeps_the_ffn_units_most_active_on_calibration_prompts(source, tmp_path, capsys):
    """Blade rule 7: a source FFN's inner activation (256 wide) brought to a 64-wide target by the 64 units
    of largest mean |activation| over every calibration token, chosen by hand here from a hook on the
    source's down projection (the test's own path)."""
    model, tokenizer = source
    seen = []
    handle = model.model.layers[5].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0][0]))
    with torch.no_grad():
        for prompt in CALIBRATION + PROMPTS:
            model(input_ids=tokenizer([prompt], return_tensors="pt")["input_ids"])
    handle.remove()
    magnitude = torch.cat(seen[: len(CALIBRATION)]).abs().mean(0)
    keep = magnitude.topk(HIDDEN).indices.sort().values
    want = torch.stack([act.mean(0) for act in seen[len(CALIBRATION):]]).mean(0)[keep]
    path = tmp_path / "ffn.blade.safetensors"
    blade = garage.blades.extract(model, tokenizer, PROMPTS, site="h.5.mlp.hidden", project="topk", width=HIDDEN,
                                  calibration=CALIBRATION, path=path)
    assert blade.tensor.shape == (HIDDEN,) and torch.allclose(blade.tensor, want, atol=1e-4)
    assert blade.metadata["indices"] == str(keep.tolist()) and blade.metadata["source_width"] == "256"
    assert blade.metadata["hidden_size"] == str(HIDDEN) and blade.metadata["site"] == "h.5.mlp.hidden"
    target = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    handle = target.model.layers[2].register_forward_hook(on_output(lambda h: h + 0.5 * want))
    with torch.no_grad():
        expected = target(input_ids=ids).logits
    handle.remove()
    got = garage.compile(target, f'at h.2 blade identity from "{path}" alpha 0.5')(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    (tmp_path / "c.txt").write_text("\n".join(CALIBRATION))
    assert main(["blade", "extract", "--model", "tiny:llama", "--site", "h.5.mlp.hidden", "--project", "topk",
                 "--width", str(HIDDEN), "--calibration", str(tmp_path / "c.txt"), "--prompts", str(tmp_path / "p.txt"),
                 "-o", str(tmp_path / "cli.safetensors")]) == 0
    assert garage.blades.info(tmp_path / "cli.safetensors")["indices"] == str(keep.tolist())
    with pytest.raises(ValueError, match="choose a width in 1..256"):
        garage.blades.extract(model, tokenizer, PROMPTS, site="h.5.mlp.hidden", project="topk", width=300)


def test_a_blade_file_whose_metadata_disagrees_is_refused_at_its_span(tmp_path):
    """A [64] tensor whose file says it came from a 96-wide model: the recorded size is believed (a file
    cut down by hand would still carry another model's state); metadata that is not a number is ignored."""
    from safetensors.torch import save_file

    save_file({"blade": torch.randn(HIDDEN)}, str(tmp_path / "lies.safetensors"), metadata={"hidden_size": "96"})
    save_file({"blade": torch.randn(HIDDEN)}, str(tmp_path / "odd.safetensors"),
              metadata={"hidden_size": "n/a", "depth": "deep", "layer": "x"})
    model = tiny_model("llama")
    report = garage.check(model, f'at h.2 blade gated from "{tmp_path / "lies.safetensors"}"')
    (error,) = report.errors
    assert "comes from a source with hidden size 96" in error.message and (error.line, error.column) == (1, 25)
    assert garage.check(model, f'at h.2 blade gated from "{tmp_path / "odd.safetensors"}"').ok
