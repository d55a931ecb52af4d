"""Encoder–decoder models (T5, BART, Marian, Whisper): `encoder.h.I`, `decoder.h.I`, `decoder.h.I.cross`, each
stack's embed and final, positions per stack, scoring through the injected graph and greedy generation through
the model's own seq2seq `generate`, each against hooks written here with their own module paths and formulas."""

from __future__ import annotations

import warnings

import pytest
import torch
from zoo import SEQ2SEQ, tiny_model, tiny_seq2seq

import garage
from garage.lang.diagnostics import GarageWarning, ResolveError

# Each family's modules, written out by hand: the encoder, a block of each stack, encoder attention, the decoder's
# FFN down projection, cross-attention and self-attention output projection.
_BART_LIKE = {"encoder": "model.encoder", "enc": "model.encoder.layers.{}", "dec": "model.decoder.layers.{}",
              "enc_attn": "model.encoder.layers.{}.self_attn", "dec_down": "model.decoder.layers.{}.fc2",
              "cross": "model.decoder.layers.{}.encoder_attn", "dec_o": "model.decoder.layers.{}.self_attn.out_proj"}
PATHS = {
    "t5": {"encoder": "encoder", "enc": "encoder.block.{}", "dec": "decoder.block.{}",
           "enc_attn": "encoder.block.{}.layer.0.SelfAttention", "dec_down": "decoder.block.{}.layer.2.DenseReluDense.wo",
           "cross": "decoder.block.{}.layer.1.EncDecAttention", "dec_o": "decoder.block.{}.layer.0.SelfAttention.o"},
    "bart": _BART_LIKE, "marian": _BART_LIKE, "whisper": _BART_LIKE,
}
HEAD = 8  # 32 wide, 4 heads

SPEC = """
at encoder.embed scale 0.5
at encoder.h.0[0] scale 2
at encoder.h.1.attn scale 1.5
at decoder.h.0.mlp.hidden scale 2
at decoder.h.N-1.cross scale 0.25
at decoder.h.1.attn.heads{1} zero
at decoder.h.0[1] scale 3
"""


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, h):
    return (h, *out[1:]) if isinstance(out, tuple) else h


class Reference:
    """SPEC as forward hooks on the eager model. Source positions count from each row's first real token (the
    mask the encoder is called with); target positions from the first target token, across generation steps."""

    def __init__(self, model, family: str) -> None:
        self.model, self.paths, self.handles = model, PATHS[family], []
        self.source_mask = None
        self.seen = 0  # target tokens decoder block 0 has run since the encoder last ran

    def module(self, key: str, layer: int | None = None):
        path = self.paths[key]
        return self.model.get_submodule(path.format(layer) if layer is not None else path)

    def __enter__(self):
        def encoder_called(_m, args, kwargs):
            mask = kwargs.get("attention_mask")
            self.source_mask, self.seen = mask, 0

        def scale_input(factor):
            def hook(_m, args, kwargs):
                if args:
                    return (args[0] * factor, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * factor}
            return hook

        def source_position0(_m, _a, out):
            h = _first(out).clone()
            if self.source_mask is None:
                h[:, 0] *= 2
            else:
                first = (self.source_mask == 0).sum(-1)  # left padding: the first real token's column
                h[torch.arange(h.shape[0]), first] *= 2
            return _with_first(out, h)

        def target_position1(_m, _a, out):
            h = _first(out)
            start, self.seen = self.seen, self.seen + h.shape[1]
            if start <= 1 < start + h.shape[1]:
                h = h.clone()
                h[:, 1 - start] *= 3
            return _with_first(out, h)

        def scale_output(factor):
            return lambda _m, _a, out: _with_first(out, _first(out) * factor)

        def zero_head(_m, args):
            h = args[0].clone()
            h[..., HEAD:2 * HEAD] = 0
            return (h, *args[1:])

        last = self.model.config.decoder_layers if hasattr(self.model.config, "decoder_layers") else 3
        add = self.handles.append
        add(self.module("encoder").register_forward_pre_hook(encoder_called, with_kwargs=True))
        add(self.module("enc", 0).register_forward_pre_hook(scale_input(0.5), with_kwargs=True))
        add(self.module("enc", 0).register_forward_hook(source_position0))
        add(self.module("enc_attn", 1).register_forward_hook(scale_output(1.5)))
        add(self.module("dec_down", 0).register_forward_pre_hook(lambda _m, args: (args[0] * 2, *args[1:])))
        add(self.module("cross", last - 1).register_forward_hook(scale_output(0.25)))
        add(self.module("dec_o", 1).register_forward_pre_hook(zero_head))
        add(self.module("dec", 0).register_forward_hook(target_position1))
        return self

    def __exit__(self, *exc):
        while self.handles:
            self.handles.pop().remove()


def _source(family: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "whisper":
        return {"input_features": torch.randn(2, 8, 24, generator=g)}
    ids = torch.randint(3, 100, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # row 0 left-padded by two
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", list(SEQ2SEQ))
def test_scoring_through_the_graph_equals_hand_written_hooks(family):
    model = tiny_seq2seq(family)
    inj = garage.compile(model, SPEC)
    empty = garage.compile(model, "")
    for seed in (1, 2):
        source = _source(family, seed)
        target = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(seed + 10))
        with torch.no_grad():
            plain = model(**source, decoder_input_ids=target).logits
            with Reference(model, family):
                want = model(**source, decoder_input_ids=target).logits
            got = inj(**source, decoder_input_ids=target).logits
            same = empty(**source, decoder_input_ids=target).logits
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        assert (want - plain).abs().max() > 1e-3  # the ops act
        assert torch.allclose(same, plain, atol=1e-6)
    assert not inj.fallbacks  # one injected graph, no hooks
    assert "decoder_input_ids" in inj.graph_module.code


@pytest.mark.parametrize("family", ["t5", "bart", "marian", "whisper"])
def test_greedy_generation_equals_generate_under_hand_written_hooks(family):
    model = tiny_seq2seq(family, seed=3)
    spec = SPEC + "at decoder.h.2[new] capture new\nat encoder.h.1 capture source\n"
    inj = garage.compile(model, spec)
    source = _source(family, 4)
    with torch.no_grad(), Reference(model, family):
        want = model.generate(**source, max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GarageWarning)  # Whisper's generation runs by hooks, and says so
        got = inj.generate(**source, max_new_tokens=6)
    assert torch.equal(got, want), (got, want)
    # the encoder graph once, then the decoder's step graphs; Whisper's encoder reads audio: its generate, by hooks
    assert set(inj.fallbacks) == ({"generation"} if family == "whisper" else set())
    generated = got.shape[1] - (0 if family == "whisper" else 1)  # Whisper's generate leaves out its start token
    assert inj.captures["new"].shape == (2, generated - 1, 32)  # the generated tokens fed back: all but the last
    frames = 12 if family == "whisper" else 7
    assert inj.captures["source"].shape == (2, frames, 32)  # the one encoder pass


def test_layers_n_and_percent_count_within_the_stack_named():
    info = garage.compile(tiny_seq2seq("bart"), "").plan.info
    plan = garage.compile(tiny_seq2seq("bart"), "at decoder.h.N-1 scale 2; at encoder.h.-1 scale 2; "
                          "at decoder.h.50% scale 2; at encoder.h.* scale 1").plan
    assert [s.site.label for s in plan] == ["decoder.h.2", "encoder.h.1", "decoder.h.1", "encoder.h.0", "encoder.h.1"]
    assert [s.site.module_path for s in plan][:2] == ["model.decoder.layers.2", "model.encoder.layers.1"]
    assert info.stacks["encoder"].num_layers == 2 and info.stacks["decoder"].num_layers == 3


@pytest.mark.parametrize(("text", "message", "hint", "column"), [
    ("at h.1 scale 2", "it has two stacks, the encoder of 2 blocks and the decoder of 3 blocks",
     "write encoder.h.I or decoder.h.I", 4),
    ("at layers.1 scale 2", "it has two stacks", "write encoder.h.I or decoder.h.I", 4),
    ("at final scale 2", "`final` is ambiguous on an encoder–decoder model (bart)", "write encoder.final or "
     "decoder.final", 4),
    ("at embed[0] scale 2", "`embed` is ambiguous", "write encoder.embed or decoder.embed", 4),
    ("at encoder.h.1.cross scale 2", "the encoder has no cross-attention", "write decoder.h.I.cross", 4),
    ("at encoder.h.4 scale 2", "layer 4 is out of range: the encoder has 2 layers (0..1)", "0..1", 14),
    ("at decoder.final scale 2", "the decoder of this model (bart) has no final norm", "use decoder.h.-1", 4),
])
def test_stack_diagnostics_name_both_stacks_and_the_fix(text, message, hint, column):
    with pytest.raises(ResolveError) as err:
        garage.compile(tiny_seq2seq("bart"), text)
    diagnostic = err.value.diagnostics[0]
    assert message in diagnostic.message and hint in diagnostic.hint
    assert (diagnostic.line, diagnostic.column) == (1, column)


def test_a_decoder_only_model_refuses_stack_sites():
    with pytest.raises(ResolveError) as err:
        garage.compile(tiny_model("gpt2"), "at encoder.final scale 2")
    assert "has one stack of blocks, not an encoder and a decoder" in err.value.diagnostics[0].message
    with pytest.raises(ResolveError) as err:
        garage.compile(tiny_model("gpt2"), "at decoder.h.1 scale 2")
    assert "is not this model's block list" in err.value.diagnostics[0].message


def test_scoring_needs_a_target():
    inj = garage.compile(tiny_seq2seq("t5"), "at decoder.h.0 scale 2")
    with pytest.raises(TypeError, match="pass decoder_input_ids"):
        inj(input_ids=torch.randint(3, 100, (1, 4)))


@pytest.mark.parametrize("site", ["encoder.h.1", "decoder.h.0.cross"])
def test_patching_a_stack_site_equals_a_two_run_hook(site):
    model = tiny_seq2seq("marian")
    g = torch.Generator().manual_seed(5)
    clean, corrupt = torch.randint(3, 100, (2, 6), generator=g), torch.randint(3, 100, (2, 6), generator=g)
    target = torch.randint(3, 100, (2, 4), generator=g)
    path = "model.encoder.layers.1" if site.startswith("encoder") else "model.decoder.layers.0.encoder_attn"
    module, kept = model.get_submodule(path), {}
    handle = module.register_forward_hook(lambda _m, _a, out: kept.setdefault("h", _first(out)))
    with torch.no_grad():
        model(input_ids=corrupt, decoder_input_ids=target)
    handle.remove()
    handle = module.register_forward_hook(lambda _m, _a, out: _with_first(out, kept["h"]))
    with torch.no_grad():
        want = model(input_ids=clean, decoder_input_ids=target).logits
    handle.remove()
    inj = garage.compile(model, f"at {site} patch from source")
    got = inj(input_ids=clean, decoder_input_ids=target, source={"input_ids": corrupt, "decoder_input_ids": target})
    assert torch.allclose(got.logits, want, atol=1e-5)


def test_steering_vectors_at_encoder_and_decoder_sites():
    from garage.models import char_tokenizer

    model, tokenizer = tiny_seq2seq("bart"), char_tokenizer()
    positive, negative = ["good day", "nice one"], ["bad time", "sad news"]  # one length: BART places tokens by column
    for site in ("encoder.h.1", "decoder.h.2"):
        vector = garage.vectors.contrast(model, tokenizer, positive, negative, site=site)
        means = []
        for prompts in (positive, negative):
            rows = []
            for prompt in prompts:  # one prompt at a time: no padding
                ids = tokenizer(prompt, return_tensors="pt").input_ids
                kept = {}
                path = "model.encoder.layers.1" if site.startswith("encoder") else "model.decoder.layers.2"
                handle = model.get_submodule(path).register_forward_hook(lambda _m, _a, o: kept.setdefault("h", _first(o)))
                with torch.no_grad():
                    model(input_ids=ids, decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id]]))
                handle.remove()
                rows.append(kept["h"][0].mean(0))
            means.append(torch.stack(rows).mean(0))
        assert torch.allclose(vector, means[0] - means[1], atol=1e-5), site


def test_a_blade_taken_at_a_decoder_site_is_added_there(tmp_path):
    from garage.models import char_tokenizer

    source, target, tokenizer = tiny_seq2seq("bart", seed=1), tiny_seq2seq("bart", seed=2), char_tokenizer()
    blade = garage.blades.extract(source, tokenizer, ["first prompt", "a second"], site="decoder.h.1",
                                  path=tmp_path / "b.safetensors")
    assert blade.metadata["site"] == "decoder.h.1" and blade.metadata["num_layers"] == "3"  # the decoder's blocks
    inj = garage.compile(target, f'at decoder.h.1 blade identity from "{tmp_path / "b.safetensors"}" alpha 1')
    g = torch.Generator().manual_seed(6)
    ids, dec = torch.randint(3, 100, (2, 6), generator=g), torch.randint(3, 100, (2, 4), generator=g)
    vector = blade.tensor
    handle = target.get_submodule("model.decoder.layers.1").register_forward_hook(
        lambda _m, _a, out: _with_first(out, _first(out) + vector))
    with torch.no_grad():
        want = target(input_ids=ids, decoder_input_ids=dec).logits
    handle.remove()
    assert torch.allclose(inj(input_ids=ids, decoder_input_ids=dec).logits, want, atol=1e-5)


def test_garage_run_loads_a_seq2seq_folder_and_translates_with_the_spec(tmp_path, capsys):
    from transformers import MarianMTModel

    from garage.cli import main
    from garage.models import char_tokenizer

    folder = tmp_path / "marian"
    tiny_seq2seq("marian").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    spec = tmp_path / "steer.garage"
    spec.write_text("at decoder.h.1 scale 0.5\nat encoder.h.0 scale 2\n")
    assert main(["run", str(spec), "--model", str(folder), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    model, tokenizer = MarianMTModel.from_pretrained(folder).eval(), char_tokenizer()
    ids = tokenizer(["hello"], return_tensors="pt")
    with torch.no_grad():  # the test's own hooks: decoder block 1 halved, encoder block 0 doubled
        handles = [model.get_submodule("model.decoder.layers.1").register_forward_hook(
                       lambda _m, _a, out: _with_first(out, _first(out) * 0.5)),
                   model.get_submodule("model.encoder.layers.0").register_forward_hook(
                       lambda _m, _a, out: _with_first(out, _first(out) * 2))]
        want = model.generate(**ids, max_new_tokens=4, do_sample=False)
        for handle in handles:
            handle.remove()
    text = tokenizer.decode(want[0], skip_special_tokens=True).strip("\n")
    assert f"== with {spec}\n{text}\n" in capsys.readouterr().out
