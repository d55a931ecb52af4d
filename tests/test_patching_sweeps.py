"""`garage.analyze.patching`: every cell of a sweep against a single-cell run written here, and attribution
patching against this file's own gradient.

The references hook the eager model at module paths from this file's own table, patch one cell (one block
at one token, or one head at every token), and compute the logit difference with their own formula.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import tiny_model

from garage.analyze import patching

BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}
HEAD_OUT = {"gpt2": "attn.c_proj", "llama": "self_attn.o_proj"}
HEADS = 4
ANSWER, WRONG = 7, 11


def module(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def prompts(seed: int, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 100, (1, length), generator=g)
    corrupt = clean.clone()
    corrupt[0, 1:3] = torch.randint(3, 100, (2,), generator=g)  # the "subject" tokens
    return clean, corrupt


def logit_diff(logits: torch.Tensor) -> float:
    return float(logits[0, -1, ANSWER] - logits[0, -1, WRONG])


def value_at(model: nn.Module, ids: torch.Tensor, path: str, at_input: bool) -> torch.Tensor:
    kept: list[torch.Tensor] = []
    target = module(model, path)
    handle = (target.register_forward_pre_hook(lambda _m, args: kept.append(args[0].clone())) if at_input else
              target.register_forward_hook(lambda _m, _a, out: kept.append((out[0] if isinstance(out, tuple) else out).clone())))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return kept[0]


def one_cell(model: nn.Module, clean: torch.Tensor, corrupt: torch.Tensor, path: str, at_input: bool,
             token: int | None, head: int | None) -> float:
    """The corrupt run with the clean value put in at one token (or at one head, every token)."""
    new = value_at(model, clean, path, at_input)

    def put(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        if head is None:
            out[:, token] = new[:, token]
        else:
            split, src = out.reshape(*out.shape[:-1], HEADS, -1), new.reshape(*new.shape[:-1], HEADS, -1)
            split[..., head, :] = src[..., head, :]
        return out
    target = module(model, path)
    handle = (target.register_forward_pre_hook(lambda _m, args: (put(args[0]), *args[1:])) if at_input else
              target.register_forward_hook(lambda _m, _a, out: (put(out[0]), *out[1:]) if isinstance(out, tuple) else put(out)))
    with torch.no_grad():
        got = logit_diff(model(input_ids=corrupt).logits)
    handle.remove()
    return got


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("sites", ["h.*", "h.*.attn.heads"])
def test_every_cell_equals_its_single_cell_run(name, sites):
    model = tiny_model(name)
    clean, corrupt = prompts(hash((name, sites)) % 100)
    result = patching(model, clean, corrupt, sites=sites, answer=ANSWER, wrong=WRONG, batch_size=7)
    with torch.no_grad():
        want_clean, want_corrupt = logit_diff(model(input_ids=clean).logits), logit_diff(model(input_ids=corrupt).logits)
    assert result.clean == pytest.approx(want_clean, abs=1e-5) and result.corrupt == pytest.approx(want_corrupt, abs=1e-5)
    heads = "heads" in sites
    assert result.columns == ([f"head {h}" for h in range(HEADS)] if heads else [str(int(t)) for t in clean[0]])
    for layer in range(len(result.rows)):
        path = f"{BLOCKS[name]}.{layer}" + (f".{HEAD_OUT[name]}" if heads else "")
        for column in range(len(result.columns)):
            want = one_cell(model, clean, corrupt, path, heads, None if heads else column, column if heads else None)
            assert abs(float(result.values[layer, column]) - want) <= 1e-5 * max(1.0, abs(want)), (layer, column)
            normalised = (want - want_corrupt) / (want_clean - want_corrupt)
            assert float(result.table[layer, column]) == pytest.approx(normalised, abs=1e-4)


def test_the_last_block_at_every_token_restores_the_clean_run_exactly():
    model = tiny_model("llama")
    clean, corrupt = prompts(3)
    result = patching(model, clean, corrupt, sites="h.{0, -1}", positions="all", answer=ANSWER, wrong=WRONG)
    assert result.columns == ["all"] and result.rows == ["h.0", "h.3"]
    assert float(result.values[1, 0]) == pytest.approx(result.clean, abs=1e-5)
    assert float(result.table[1, 0]) == pytest.approx(1.0, abs=1e-5 / abs(result.clean - result.corrupt))


@pytest.mark.parametrize("seed", [0, 1])
def test_attribution_is_the_gradient_times_the_difference(seed):
    model = tiny_model("gpt2")
    clean, corrupt = prompts(seed)
    result = patching(model, clean, corrupt, sites="h.*.mlp", answer=ANSWER, wrong=WRONG, method="attribution")
    # this file's own gradient: hooks keep each MLP output of the corrupt run, with its gradient
    kept: list[torch.Tensor] = []

    def keep(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        kept.append(out)
    handles = [module(model, f"transformer.h.{i}.mlp").register_forward_hook(keep) for i in range(4)]
    logits = model(input_ids=corrupt).logits
    for handle in handles:
        handle.remove()
    (logits[0, -1, ANSWER] - logits[0, -1, WRONG]).backward()
    for layer, h in enumerate(kept):
        delta = value_at(model, clean, f"transformer.h.{layer}.mlp", False) - h.detach()
        want = (delta * h.grad)[0].sum(-1) + result.corrupt
        assert torch.allclose(result.values[layer], want, atol=1e-5)
    model.zero_grad(set_to_none=True)


def test_a_sweep_says_what_is_wrong_with_its_inputs():
    model = tiny_model("gpt2")
    clean, corrupt = prompts(0)
    with pytest.raises(ValueError, match="equal token count"):
        patching(model, clean, corrupt[:, :-1], answer=ANSWER, wrong=WRONG)
    with pytest.raises(ValueError, match="give answer= and wrong="):
        patching(model, clean, corrupt)
    with pytest.raises(ValueError, match="nothing to restore"):
        patching(model, clean, clean, answer=ANSWER, wrong=WRONG)
    with pytest.raises(ValueError, match="sites='h.9'"):
        patching(model, clean, corrupt, sites="h.9", answer=ANSWER, wrong=WRONG)
    last = patching(model, clean, corrupt, sites="h.1", positions="last", answer=ANSWER, wrong=WRONG)
    assert last.columns == ["last"] and last.rows == ["h.1[last]"]
    want = one_cell(model, clean, corrupt, "transformer.h.1", False, clean.shape[1] - 1, None)
    assert float(last.values[0, 0]) == pytest.approx(want, abs=1e-5)


# ------------------------------------------------------------------ the command line and the picture
def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_garage_patch_prints_the_table_writes_the_heatmap_and_json_equals_the_api(capsys, tmp_path):
    import json

    from garage.cli import main
    from garage.models import load_model_and_tokenizer

    pytest.importorskip("matplotlib")
    argv = ["patch", "--model", "tiny:llama", "--clean", "abcdef", "--corrupt", "abXYef", "--answer", "g", "--wrong", "z"]
    assert main([*argv, "-o", str(tmp_path / "heat.png")]) == 0
    text = capsys.readouterr().out
    assert "0 = corrupt, 1 = clean" in text and "h.7" in text and str(tmp_path / "heat.png") in text
    # the documented size: (300 + 45·columns) × (150 + 30·rows) pixels, at least 500 × 300
    assert png_size(tmp_path / "heat.png") == (max(500, 300 + 45 * 6), max(300, 150 + 30 * 8))
    assert main([*argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model, tokenizer = load_model_and_tokenizer("tiny:llama")
    want = patching(model, "abcdef", "abXYef", answer="g", wrong="z", tokenizer=tokenizer)
    assert got["rows"] == want.rows and got["columns"] == list("abcdef")
    assert torch.allclose(torch.tensor(got["table"]), want.table) and got["clean"] == pytest.approx(want.clean)


def test_without_matplotlib_the_picture_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    import sys

    from garage.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code = main(["patch", "--model", "tiny:gpt2", "--clean", "abcd", "--corrupt", "abXd", "--answer", "e",
                 "--wrong", "z", "-o", str(tmp_path / "heat.png")])
    assert code == 2 and 'pip install "garage[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "heat.png").exists()
