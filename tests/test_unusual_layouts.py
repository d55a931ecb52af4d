"""Layouts the usual site rules do not cover, each held to a hook written here with its own module path:
hidden states kept transposed (XLNet's [seq, batch, hidden], SqueezeBERT's [batch, hidden, seq]), a module
called twice (nanochat's final norm), a block that reads the embeddings beside its stream (NeoMME), looped
blocks (Dory), and Reformer's two streams, refused with the reason. The families are built as
bench/sweep.py builds them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import garage
from garage.lang.diagnostics import ResolveError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import sweep  # noqa: E402

IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(IDS)
MASK[1, :2] = 0  # left padding: row 1's first real token is column 2
FIRST = (MASK == 0).sum(-1)


def _tiny(family: str, head: str):
    """The family built as the sweep builds it; skipped on a transformers release that does not have it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {family}")
    return sweep.tiny(family, head)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, h):
    return (h, *out[1:]) if isinstance(out, tuple) else h


def _logits(model, hooks=()):
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            out = model(input_ids=IDS, attention_mask=MASK)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize(("family", "head", "path", "layout"), [
    ("xlnet", "causal", "transformer.layer.1", "tbh"),  # [seq, batch, hidden]
    ("squeezebert", "masked", "transformer.encoder.layers.1.output", "bht"),  # its encoder calls each block's
])  # forward directly, past hooks: the hook goes on the block's last sublayer, whose output the block returns
def test_transposed_states_are_seen_as_batch_seq_hidden(family, head, path, layout):
    model = _tiny(family, head)

    def position_zero_halved(_m, _a, out):
        h = _first(out).clone()
        rows = torch.arange(h.shape[0] if layout == "bht" else h.shape[1])
        if layout == "tbh":
            h[FIRST, rows] *= 0.5
        else:
            h[rows, :, FIRST] *= 0.5
        return _with_first(out, h)

    want = _logits(model, [(model.get_submodule(path), position_zero_halved)])
    inj = garage.compile(model, "at h.1[0] scale 0.5")
    got = inj(input_ids=IDS, attention_mask=MASK).logits
    assert torch.allclose(got, want, atol=1e-5) and (want - _logits(model)).abs().max() > 1e-4
    assert inj.explain_rows()[0]["shape"] == "[batch, seq, 64]"


def test_a_module_called_twice_has_its_ops_at_each_call():
    model = _tiny("nanochat", "causal")  # its final norm also normalises the embeddings
    want = _logits(model, [(model.model.norm, lambda _m, _a, out: out * 0.5)])
    assert torch.allclose(garage.compile(model, "at final scale 0.5")(input_ids=IDS, attention_mask=MASK).logits,
                          want, atol=1e-5)


@pytest.mark.parametrize(("family", "head"), [("neomme", "masked"), ("dory", "causal")])
def test_a_block_input_is_its_residual_stream(family, head):
    model = _tiny(family, head)  # NeoMME's blocks also read the embeddings; Dory runs its blocks in a loop
    block = model.get_submodule("model.layers.1")
    handle = block.register_forward_pre_hook(lambda _m, args: (args[0] * 0.5, *args[1:]))
    try:
        want = _logits(model)
    finally:
        handle.remove()
    got = garage.compile(model, "at h.1.in scale 0.5")(input_ids=IDS, attention_mask=MASK).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_reformer_refuses_a_block_input_with_the_reason():
    model = _tiny("reformer", "causal")
    for text, column in (("at h.1.in scale 2", 4), ("at embed scale 2", 4)):
        with pytest.raises(ResolveError) as err:
            garage.compile(model, text)
        diagnostic = err.value.diagnostics[0]
        assert "two residual streams" in diagnostic.message and diagnostic.column == column
    got = garage.compile(model, "at final scale 0.5")(input_ids=IDS, attention_mask=MASK).logits  # both streams,
    want = _logits(model, [(model.reformer.encoder.layer_norm, lambda _m, _a, out: out * 0.5)])  # [.., 2 × hidden]
    assert torch.allclose(got, want, atol=1e-5)
