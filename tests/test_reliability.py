"""Hostile input gets a clear GarageError at the right place, or works; nothing the user hands garage changes.

One test per reproducer found by trying garage as a new user would: deep and huge specs, odd line breaks,
odd tensors, hostile files, wrapped models, modules fake tensors cannot run, and the command line.
"""

from __future__ import annotations

import os
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from zoo import HIDDEN, tiny_model

import garage
from garage.cli import main


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_model("gpt2")


def errors_of(call, *args, **kwargs) -> list[garage.Diagnostic]:
    with pytest.raises(garage.GarageError) as info:
        call(*args, **kwargs)
    return info.value.diagnostics


# ------------------------------------------------------------------ the language
def test_a_deep_dotted_path_parses():
    spec = garage.parse("at " + "a." * 500 + "a zero")
    assert spec.statements[0].site.path == "a." * 500 + "a"


def test_rendering_many_errors_is_capped_and_parsing_stays_linear():
    start = time.perf_counter()
    diagnostics = errors_of(garage.parse, "x;" * 40_000)
    assert len(diagnostics) == 40_000
    text = str(garage.SpecError(diagnostics))
    assert len(text) < 50_000 and "... and 39950 more" in text and text.endswith("40000 errors")
    assert time.perf_counter() - start < 10
    start = time.perf_counter()
    garage.parse("at h.1 scale 0.5\n" * 10_000)
    assert time.perf_counter() - start < 3


def test_a_long_line_is_shown_around_the_caret():
    text = "at h.1 zero; " * 300 + "at h.1 zer"
    (diagnostic,) = errors_of(garage.parse, text)
    source, caret = diagnostic.render().splitlines()[1:3]
    assert len(source) < 260 and source.rstrip().endswith("at h.1 zer")
    assert caret.index("^") == source.index("zer", len(source) - 5)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_line_break_is_one_and_the_shown_line_is_the_right_one(newline):
    (diagnostic,) = errors_of(garage.parse, f"at h.1 zero{newline}at h.2 zer")
    assert (diagnostic.line, diagnostic.column) == (2, 8)
    assert diagnostic.source_line == "at h.2 zer"


@pytest.mark.parametrize("separator", ["\x0b", "\x85", "\u2028"])
def test_other_separators_are_errors_not_line_breaks(separator):
    (diagnostic,) = errors_of(garage.parse, f"at h.1 zero{separator}at h.2 zero")
    assert diagnostic.line == 1 and diagnostic.column == 12


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.garage"
    path.write_bytes("\ufeffat h.1 zero\n".encode())
    assert garage.load(path) == garage.parse("at h.1 zero")


def test_a_dropout_rate_outside_zero_to_one_is_an_error_at_the_strength():
    (diagnostic,) = errors_of(garage.parse, "at h.1 debate gated views dropout strength 2")
    assert "not a probability" in diagnostic.message and diagnostic.column == 35


# ------------------------------------------------------------------ values and files
def test_an_unexpandable_home_is_a_diagnostic(model):
    (diagnostic,) = errors_of(garage.compile, model, 'at h.1 add "~nosuchuser_garage/v.pt"')
    assert "cannot expand" in diagnostic.message and diagnostic.column == 12


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_vectors_are_densified(model, tmp_path, layout):
    dense = torch.randn(HIDDEN)
    dense[::3] = 0
    sparse = dense.to_sparse() if layout == "coo" else dense[None].to_sparse_csr()
    torch.save(sparse, tmp_path / "v.pt")
    ids = torch.randint(3, 100, (2, 5))
    for spec, bind in (("at h.1 add v", {"v": sparse}), (f'at h.1 add "{tmp_path / "v.pt"}"', None)):
        got = garage.compile(model, spec, bind=bind)(input_ids=ids).logits
        want = garage.compile(model, "at h.1 add v", bind={"v": dense})(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-6)


def test_meta_tensors_and_modules_are_refused_at_their_span(model):
    (diagnostic,) = errors_of(garage.compile, model, "at h.1 ablate v", bind={"v": torch.empty(HIDDEN, device="meta")})
    assert "meta device" in diagnostic.message and diagnostic.column == 15
    with torch.device("meta"):
        adapter = nn.Linear(HIDDEN, HIDDEN)
    (diagnostic,) = errors_of(garage.compile, model, "at h.1 module a", bind={"a": adapter})
    assert "meta device" in diagnostic.message and diagnostic.column == 8


def test_fp8_vectors_are_up_cast(model):
    vector = torch.randn(HIDDEN)
    ids = torch.randint(3, 100, (2, 5))
    bind = {"v": vector.to(torch.float8_e4m3fn), "w": torch.randn(2 * HIDDEN).to(torch.float8_e5m2)}
    widened = {name: t.float() for name, t in bind.items()}  # the same values, already in float32
    for spec in ("at h.1 ablate v", "at h.1 blade gated from w project topk"):
        got = garage.compile(model, spec, bind=bind)(input_ids=ids).logits
        assert torch.allclose(got, garage.compile(model, spec, bind=widened)(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("shape", [(), (2, 5, HIDDEN), (3, 1, 4, HIDDEN)])
def test_a_blade_is_one_vector_or_one_sequence(model, shape):
    spec = "at h.1 blade gated from b project linear"
    (diagnostic,) = garage.check(model, spec, bind={"b": torch.randn(shape)}).errors
    assert "a blade is one vector [hidden] or one sequence" in diagnostic.message and diagnostic.column == 25


def test_a_blade_with_leading_ones_is_a_vector(model):
    report = garage.check(model, "at h.1 blade gated from b", bind={"b": torch.randn(1, 1, HIDDEN)})
    assert report.ok


def test_files_that_are_not_regular_are_named_so(model, tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    (diagnostic,) = errors_of(garage.compile, model, f'at h.1 add "{fifo}"')
    assert "not a regular file" in diagnostic.message
    device = tmp_path / "zero.pt"
    device.symlink_to("/dev/zero")  # a character device behind a tensor file's name
    (diagnostic,) = errors_of(garage.compile, model, f'at h.1 add "{device}"')
    assert "not a regular file" in diagnostic.message
    (diagnostic,) = errors_of(garage.compile, model, f'at h.1 add "{tmp_path / "missing.pt"}"')
    assert "not found" in diagnostic.message


def test_a_compressed_pt_file_is_refused_before_it_is_inflated(model, tmp_path):
    plain, bomb = tmp_path / "plain.pt", tmp_path / "bomb.pt"
    torch.save(torch.zeros(HIDDEN), plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            target.writestr(item.filename, source.read(item.filename))
    (diagnostic,) = errors_of(garage.compile, model, f'at h.1 add "{bomb}"')
    assert "compressed" in diagnostic.message


def test_a_huge_tensor_is_refused_from_its_header(model, tmp_path, monkeypatch):
    from garage.plan import files

    monkeypatch.setattr(files, "MAX_ELEMENTS", 1000)
    save_file({"big": torch.zeros(10, 200)}, tmp_path / "big.safetensors")
    (diagnostic,) = errors_of(garage.compile, model, f'at h.1 add "{tmp_path / "big.safetensors"}"')
    assert "too large" in diagnostic.message


def test_a_file_of_many_tensors_lists_twenty_names(model, tmp_path):
    save_file({f"t{i:04}": torch.zeros(1) for i in range(500)}, tmp_path / "many.safetensors")
    (diagnostic,) = errors_of(garage.compile, model, f'at h.1 add "{tmp_path / "many.safetensors"}"')
    assert "holds 500 tensors" in diagnostic.message and "(480 more)" in diagnostic.hint and len(diagnostic.hint) < 400


def test_a_spec_that_is_a_pipe_or_device_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "spec.garage"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        (diagnostic,) = errors_of(garage.load, path)
        assert "not a regular file" in diagnostic.message


# ------------------------------------------------------------------ the checker catches what running would
def test_bound_modules_are_never_changed(model):
    adapter = nn.Linear(HIDDEN, HIDDEN).half()
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    ids = torch.randint(3, 100, (2, 5))
    assert garage.check(model, "at h.1 module a", bind={"a": adapter}).ok
    inj = garage.compile(model, "at h.1 module a", bind={"a": adapter})
    inj(input_ids=ids)
    assert all(p.dtype == torch.float16 for p in adapter.parameters())
    assert all(torch.equal(before[k], v) for k, v in adapter.state_dict().items())
    same = nn.Linear(HIDDEN, HIDDEN)
    assert garage.compile(model, "at h.1 module a", bind={"a": same}).ops[0] is same  # shared where it fits


class Gate(nn.Module):
    """Branches on values: runs eagerly, but fake tensors cannot decide the branch."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * 2 if h.mean() > 0 else h


class Widen(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, h], dim=-1)


def test_fake_tensor_limits_warn_and_real_shape_errors_stay_errors(model):
    report = garage.check(model, "at h.1 module g", bind={"g": Gate()})
    assert report.ok and [w.rule for w in report.warnings] == ["unchecked-shape"]
    everywhere = garage.check(model, "at h.* module g", bind={"g": Gate()})  # one warning, not one a layer
    assert [w.rule for w in everywhere.warnings] == ["unchecked-shape"]
    with pytest.warns(garage.GarageWarning, match="could not be checked"):
        inj = garage.compile(model, "at h.1 module g", bind={"g": Gate()})
    ids = torch.randint(3, 100, (2, 5))
    with torch.no_grad(), garage.hook(model, "at h.1 module g", bind={"g": Gate()})[0]:
        assert torch.allclose(inj(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    (error,) = garage.check(model, "at h.1 module w", bind={"w": Widen()}).errors
    assert "maps [batch, seq, 64] to [batch, seq, 128]" in error.message


def test_lint_warnings_are_python_warnings_too(model):
    with pytest.warns(garage.GarageWarning, match="gated-over-identity"):
        garage.compile(model, "at h.0 blade identity from b", bind={"b": torch.randn(HIDDEN)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        garage.compile(model, "at h.1 scale 0.5")  # no warning, nothing raised


# ------------------------------------------------------------------ wrapped models and trace failures
def test_a_model_whose_forward_was_replaced_is_named_as_wrapped():
    wrapped = tiny_model("gpt2", seed=7)
    original = type(wrapped).forward

    def hijacked(*args, **kwargs):  # what a wrapping library does: an unbound function on the instance
        return original(*args, **kwargs)

    wrapped.forward = hijacked
    with pytest.raises(garage.ValidationError) as info:
        garage.compile(wrapped, "at h.1 scale 0.5")
    (diagnostic,) = info.value.diagnostics
    assert "forward was replaced on the instance by" in diagnostic.message and "hijacked" in diagnostic.message
    assert "unwrapped model" in diagnostic.hint
    assert info.value.__cause__ is not None  # torch's own error is kept


def test_garage_debug_adds_the_traceback(monkeypatch):
    wrapped = tiny_model("gpt2", seed=8)
    wrapped.forward = lambda *args, **kwargs: None
    (plain,) = garage.check(wrapped, "at h.1 scale 0.5").errors
    monkeypatch.setenv("GARAGE_DEBUG", "1")
    (debug,) = garage.check(wrapped, "at h.1 scale 0.5").errors
    assert "Traceback (most recent call last)" in debug.message and "Traceback" not in plain.message
    assert debug.message.startswith(plain.message)


# ------------------------------------------------------------------ the command line
def test_run_validates_its_arguments_before_loading(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "examples/steer.garage", "--model", "tiny:gpt2", "--max-new-tokens", "-5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "negative" in err and "loading" not in err


def test_a_missing_model_folder_is_named(capsys):
    assert main(["check", "examples/steer.garage", "--model", "./missing-folder"]) == 2
    assert "no such model folder: ./missing-folder" in capsys.readouterr().err


def test_an_unknown_hub_id_fails_fast_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["check", "examples/steer.garage", "--model", "nobody/no-such-model"]) == 2
    assert time.perf_counter() - start < 5
    assert "cannot be reached" in capsys.readouterr().err


def test_a_model_garage_cannot_read_is_a_diagnostic_not_a_type_error():
    """ALBERT shares one block across its layers (no ModuleList of num_hidden_layers blocks), and a bare
    module has no config: both are GarageErrors that say why, from check, compile and hook alike."""
    from transformers import AlbertConfig, AlbertForMaskedLM

    albert = AlbertForMaskedLM(AlbertConfig(num_hidden_layers=4, num_hidden_groups=1, hidden_size=64,
                                            num_attention_heads=4, intermediate_size=128, embedding_size=32,
                                            vocab_size=100)).eval()
    for run in (garage.check, garage.compile, garage.hook):
        with pytest.raises(garage.ResolveError, match="cannot tell where this model's 4 blocks are"):
            run(albert, "at h.1 scale 0.5")
    with pytest.raises(garage.ResolveError, match="needs a Hugging Face model") as err:
        garage.compile(torch.nn.Linear(3, 3), "at h.1 scale 0.5")
    assert err.value.diagnostics[0].hint == "load it with transformers: garage reads its config"
