"""garage.check: every problem at its line and column, all at once, before any real tensor is computed."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from zoo import tiny_model

import garage


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")  # 4 layers, hidden 64


@pytest.fixture(scope="module")
def deep():
    return tiny_model("llama", num_hidden_layers=12)


class FakeOnly(nn.Module):
    """A module whose forward refuses real tensors: it proves that checking never runs real data."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, FakeTensor):
            raise RuntimeError("a real tensor reached the module during checking")
        return self.inner(h)


class ReturnsTuple(nn.Module):
    def forward(self, h):
        return h, h


def one(report: garage.Report, severity: str = "error") -> garage.Diagnostic:
    found = [d for d in report.diagnostics if d.severity == severity]
    assert len(found) == 1, str(report)
    return found[0]


def check(model, text: str, bind=None, filename="v.garage") -> garage.Report:
    return garage.check(model, garage.parse(text, filename=filename), bind=bind)


# ------------------------------------------------------------------ errors, one per kind
def test_a_linear_that_halves_the_hidden_size_is_reported_with_both_shapes(gpt2):
    report = check(gpt2, "at h.1 scale 2\nat h.2.mlp module half", bind={"half": FakeOnly(nn.Linear(64, 32))})
    d = one(report)
    assert (d.line, d.column, d.end_column) == (2, 12, 23)
    assert d.message == "module FakeOnly maps [batch, seq, 64] to [batch, seq, 32]"
    assert "[batch, seq, 64]" in d.hint


def test_a_module_that_fails_on_the_site_shape(gpt2):
    d = one(check(gpt2, "at h.1 module bad", bind={"bad": nn.Linear(32, 64)}))
    assert d.line == 1 and "fails on a [batch, seq, 64] input: RuntimeError" in d.message


def test_a_module_returning_a_tuple(gpt2):
    d = one(check(gpt2, "at h.1 module pair", bind={"pair": ReturnsTuple()}))
    assert "returns a tuple, not a tensor" in d.message


def test_a_blade_source_module_must_fit(gpt2):
    d = one(check(gpt2, "at h.1 blade gated from src", bind={"src": nn.Linear(64, 16)}))
    assert "blade source module Linear maps [batch, seq, 64] to [batch, seq, 16]" in d.message


def test_opt_flat_sites_are_checked_in_their_own_shape():
    d = one(check(tiny_model("opt"), "at h.1.mlp module half", bind={"half": nn.Linear(64, 32)}))
    assert "maps [batch*seq, 64] to [batch*seq, 32]" in d.message


@pytest.mark.parametrize(
    "text, bind, pos, message",
    [
        ("at h.1 add steer", {}, (1, 12, 17), "'steer' is not bound"),
        ("at h.1 add steer", {"steer": nn.Linear(2, 2)}, (1, 12, 17), "bound to a Linear, not a tensor"),
        ("at h.1 add v", {"v": torch.ones(32)}, (1, 12, 13), "'v' has 32 values [32] but this model's hidden size is 64"),
        ("at h.1 ablate v", {"v": torch.zeros(64)}, (1, 15, 16), "'v' is a zero vector"),
        ("at h.1 add v", {"v": torch.ones(64, dtype=torch.int64)}, (1, 12, 13), "'v' holds int64 values, not floating point"),
        ("at h.1 blade gated from b", {"b": torch.ones(96)}, (1, 25, 26),
         "blade 'b' comes from a source with hidden size 96, but this model's is 64"),
        ("at h.1 blade gated from b project topk", {"b": torch.ones(32)}, (1, 25, 26), "cannot widen a blade of width 32"),
        ("at h.1 module adapter", {"adapter": torch.ones(3)}, (1, 8, 22), "'adapter' is bound to a Tensor, not an nn.Module"),
        ("at h.1 module nosie(std=1)", {}, (1, 8, 27), "unknown module 'nosie'"),
    ],
)
def test_binding_and_dimension_errors(gpt2, text, bind, pos, message):
    d = one(check(gpt2, text, bind=bind))
    assert (d.line, d.column, d.end_column) == pos
    assert message in d.message
    assert d.hint


def test_projection_makes_a_wider_blade_fit(gpt2):
    assert check(gpt2, "at h.1 blade gated from b project topk; at h.2 blade gated from b project linear",
                 bind={"b": torch.randn(96)}).ok


def test_files_missing_wrong_unreadable_unsafe(gpt2, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
    save_file({"a": torch.ones(64), "b": torch.ones(64)}, str(tmp_path / "two.safetensors"))
    marker = tmp_path / "created"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Payload(), f)
    spec = tmp_path / "files.garage"
    spec.write_text(
        'at h.0 add "missing.safetensors"\n'
        'at h.1 add "notes.txt"\n'
        'at h.2 add "broken.safetensors"\n'
        'at h.3 add "two.safetensors"\n'
        'at h.0.in add "two.safetensors#c"\n'
        'at h.1.in blade gated from "evil.pt"\n'
    )
    report = garage.check(gpt2, spec)
    messages = [(d.line, d.message) for d in report.errors]
    assert [line for line, _ in messages] == [1, 2, 3, 4, 5, 6]
    assert "file not found: missing.safetensors" in messages[0][1]
    assert "unsupported file type '.txt'" in messages[1][1]
    assert "not a readable safetensors file" in messages[2][1]
    assert "holds 2 tensors; name one" in messages[3][1] and "a, b" in report.errors[3].hint
    assert "has no tensor 'c'" in messages[4][1]
    assert "refused to load evil.pt" in messages[5][1]
    assert not marker.exists()


def test_blade_files_record_their_source_hidden_size(gpt2, tmp_path):
    save_file({"blade": torch.randn(64)}, str(tmp_path / "b.safetensors"), metadata={"hidden_size": "128"})
    (tmp_path / "s.garage").write_text('at h.1 blade gated from "b.safetensors"\n')
    d = one(garage.check(gpt2, tmp_path / "s.garage"))
    assert "comes from a source with hidden size 128" in d.message and "Same-Dimension" in d.hint


# ------------------------------------------------------------------ warnings, each with its rule
def test_blade_far_from_n_minus_4(deep):
    d = one(check(deep, "at h.2 blade gated\nat N-4 blade gated\nat h.7 debate average"), "warning")
    assert (d.line, d.rule) == (1, "n-4")
    assert "far from N-4 = 8" in d.message and "h.8" in d.hint


def test_identity_where_gated_is_recommended(deep):
    d = one(check(deep, "at N-4 blade identity from b", bind={"b": torch.randn(64)}), "warning")
    assert d.rule == "gated-over-identity" and "blade gated" in d.hint


def test_blades_from_different_domains(deep, tmp_path):
    save_file({"b": torch.randn(64)}, str(tmp_path / "math.safetensors"), metadata={"domain": "math"})
    save_file({"b": torch.randn(64)}, str(tmp_path / "code.safetensors"), metadata={"domain": "code"})
    save_file({"b": torch.randn(64)}, str(tmp_path / "math2.safetensors"), metadata={"domain": "math"})
    (tmp_path / "s.garage").write_text(
        'at N-4 blade gated from "math.safetensors"\nat N-4 blade gated from "math2.safetensors"\n'
        'at N-4 blade gated from "code.safetensors"\n'
    )
    d = one(garage.check(deep, tmp_path / "s.garage"), "warning")
    assert (d.line, d.rule) == (3, "same-domain")
    assert "'code'" in d.message and "'math'" in d.message


def test_dead_and_cancelled_ops(gpt2):
    report = check(gpt2, "at h.1 scale 2\nat h.1 zero\nat h.1 scale 3\nat h.2 capture x\nat h.3 capture x")
    found = [(d.line, d.rule) for d in report.warnings]
    assert found == [(1, "dead-op"), (3, "dead-op"), (4, "capture-overwritten")]
    assert report.ok


def test_compile_keeps_warnings_and_raises_on_errors(deep):
    inj = garage.compile(deep, "at h.2 blade gated")
    assert [w.rule for w in inj.warnings] == ["n-4"]
    with pytest.raises(garage.ValidationError):
        garage.compile(deep, "at h.2 module m", bind={"m": nn.Linear(64, 8)})
    with pytest.raises(garage.ResolveError) as err:
        garage.compile(deep, "at h.99 zero; at h.1 module m", bind={"m": nn.Linear(64, 8)})
    assert len(err.value.diagnostics) == 2


# ------------------------------------------------------------------ all at once
def test_five_different_errors_are_reported_together(gpt2):
    text = (
        "expect layers 12\n"               # 1: failed expectation
        "at h.1 scael 2\n"                 # 2: syntax (unknown op)
        "at h.9 zero\n"                    # 3: index out of range
        "at h.1 add missing\n"             # 4: not bound
        "at h.2 add short\n"               # 5: wrong dimension
        "at h.3.mlp module half\n"         # 6: module changes the shape
        "at h.0 blade identity from b\n"   # 7: warnings only
    )
    report = garage.check(gpt2, text, bind={"short": torch.ones(10), "half": FakeOnly(nn.Linear(64, 32)),
                                            "b": torch.randn(64)})
    assert [d.line for d in report.errors] == [1, 2, 3, 4, 5, 6]
    assert {d.rule for d in report.warnings} == {"gated-over-identity"}
    rendered = str(report)
    assert rendered.count("error:") == 6 and rendered.endswith("6 errors, 1 warning")


def test_a_clean_spec_has_an_empty_report(gpt2):
    report = check(gpt2, "at h.1 scale 0.9; at h.*.mlp capture m")
    assert report.ok and report.diagnostics == [] and str(report) == "no problems found"
