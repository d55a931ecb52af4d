"""SAE features: SAELens folders written here, and every number held to references written here.

No SAE can be downloaded, so each test writes one in SAELens's on-disk format (cfg.json and
sae_weights.safetensors, random weights from a fixed seed). The references use nothing of garage: the
encoders are written below from SAELens's formulas, an edit is SAELens's "decode the edited features and
add back the reconstruction error", and the hidden states come from forward hooks at module paths written
here, on left-padded batches of the tiny Llama (8 blocks, hidden 128).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import garage
from garage.cli import main
from garage.sae import load_sae, site_label

D_SAE = 256
FEATURES = (5, 17, 200)
Formula = Callable[[torch.Tensor], torch.Tensor]


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, object]:
    return garage.models.load_model_and_tokenizer("tiny:llama")


def batch() -> dict[str, torch.Tensor]:
    """Three rows, two of them left-padded."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 90, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 98), "attention_mask": mask}


def module(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def run_with(model: nn.Module, inputs: dict[str, torch.Tensor], path: str, formula: Formula) -> torch.Tensor:
    """The logits with `formula` applied to the output of the module at `path` (a test's own hook)."""
    def hook(_m: nn.Module, _args: tuple, out: object) -> object:
        return (formula(out[0]), *out[1:]) if isinstance(out, tuple) else formula(out)  # type: ignore[arg-type]

    handle = module(model, path).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        handle.remove()


def state_at(model: nn.Module, inputs: dict[str, torch.Tensor], path: str) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    run_with(model, inputs, path, lambda h: seen.append(h.clone()) or h)  # type: ignore[func-returns-value]
    return seen[0]


# ------------------------------------------------------------------ SAELens folders and the reference SAE
def write_sae(folder: Path, architecture: str = "standard", hook: str = "blocks.3.hook_resid_post", d_in: int = 128,
              seed: int = 0, scale: float = 70.0, legacy: bool = False, **cfg: object) -> dict[str, torch.Tensor]:
    """An SAE in SAELens's format (≥ 6, or the flat config of older versions with `legacy`), its encoder
    scaled for states of standard deviation `scale`; returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_in, D_SAE, generator=g) / (scale * d_in ** 0.5),
         "b_enc": 0.3 * torch.randn(D_SAE, generator=g), "W_dec": 2.0 * torch.randn(D_SAE, d_in, generator=g),
         "b_dec": 0.2 * scale * torch.randn(d_in, generator=g)}
    if architecture == "jumprelu":
        t["threshold"] = torch.rand(D_SAE, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, folder / "sae_weights.safetensors")
    if legacy:
        body: dict[str, object] = {"d_in": d_in, "d_sae": D_SAE, "dtype": "float32", "hook_name": hook, "hook_layer": 3,
                                   "normalize_activations": False, "sae_lens_version": "3.13.0"}
    else:
        body = {"d_in": d_in, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                "normalize_activations": "none", "reshape_activations": "none", "architecture": architecture,
                "metadata": {"model_name": "tiny:llama", "hook_name": hook, "sae_lens_version": "6.12.0"}}
    (folder / "cfg.json").write_text(json.dumps({**body, **cfg}))
    return t


def pre_activations(h: torch.Tensor, t: dict[str, torch.Tensor], apply_b_dec: bool = True,
                    rescale: bool = False) -> np.ndarray:
    x = h.double().numpy() - (t["b_dec"].double().numpy() if apply_b_dec else 0)
    pre = x @ t["W_enc"].double().numpy() + t["b_enc"].double().numpy()
    return pre * np.linalg.norm(t["W_dec"].double().numpy(), axis=1) if rescale else pre


def encode(h: torch.Tensor, t: dict[str, torch.Tensor], architecture: str = "standard", k: int = 0,
           apply_b_dec: bool = True, rescale: bool = False) -> torch.Tensor:
    """SAELens's encode, in float64 numpy: ReLU, JumpReLU (ReLU where pre > threshold), or TopK (ReLU of the
    k largest pre-activations, after scaling them by the decoder rows' norms with `rescale`)."""
    pre = pre_activations(h, t, apply_b_dec, rescale and architecture == "topk")
    if architecture == "jumprelu":
        acts = np.where(pre > t["threshold"].double().numpy(), np.maximum(pre, 0), 0)
    elif architecture == "topk":
        top = np.argsort(-pre, axis=-1)[..., :k]
        acts = np.zeros_like(pre)
        np.put_along_axis(acts, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    else:
        acts = np.maximum(pre, 0)
    return torch.from_numpy(acts)


def decode(acts: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    return acts @ t["W_dec"].double() + t["b_dec"].double()


def edited(t: dict[str, torch.Tensor], action: str, x: float, features: tuple[int, ...] = FEATURES,
           architecture: str = "standard") -> Formula:
    """The SAE edit as SAELens users write it: decode the edited activations and add back the reconstruction
    error h − decode(encode(h)); `add X` adds X times each feature's decoder row."""
    def formula(h: torch.Tensor) -> torch.Tensor:
        if action == "add":
            return h + x * t["W_dec"][list(features)].sum(0)
        acts = encode(h, t, architecture)
        new = acts.clone()
        new[..., list(features)] = {"clamp": torch.full_like(acts[..., list(features)], x), "zero": 0 * acts[..., list(features)],
                                    "scale": x * acts[..., list(features)]}[action]
        return (decode(new, t) + (h.double() - decode(acts, t))).to(h.dtype)

    return formula


def last_only(formula: Formula) -> Formula:
    """The formula at the last position of each call (left padding: the last column of every row)."""
    def at_last(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[:, -1:] = formula(h[:, -1:])
        return out

    return at_last


def assert_logits(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> None:
    real = mask.bool()
    err = (got[real] - want[real]).abs().max() / want[real].abs().max()
    assert err < 1e-4, float(err)


# ------------------------------------------------------------------ encoders
@pytest.mark.parametrize("kind", ["standard", "jumprelu", "topk", "topk_rescaled", "legacy_topk"])
def test_capture_records_each_architectures_encoding(llama, tmp_path, kind):
    """`sae … capture` keeps encode(h) [batch, seq, d_sae] at every position of a left-padded batch."""
    model, _ = llama
    arch = {"standard": "standard", "jumprelu": "jumprelu"}.get(kind, "topk")
    extra: dict[str, object] = {}
    if kind.startswith("topk"):
        extra = {"k": 8, "rescale_acts_by_decoder_norm": kind == "topk_rescaled"}
    if kind == "legacy_topk":  # SAELens < 6: flat hook_name, activation_fn_str, k in activation_fn_kwargs
        extra = {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 8}, "apply_b_dec_to_input": False}
    t = write_sae(tmp_path / "sae", arch, seed=1, legacy=kind == "legacy_topk", **extra)
    inputs = batch()
    inj = garage.compile(model, f'at h.3 sae "{tmp_path / "sae"}" capture feats')
    with torch.no_grad():
        inj(**inputs)
    got = inj.captures["feats"]
    h = state_at(model, inputs, "model.layers.3")
    want = encode(h, t, arch, 8, apply_b_dec=kind != "legacy_topk", rescale=kind == "topk_rescaled")
    assert got.shape == (3, 9, D_SAE)
    assert (want > 0).sum(-1).min() > 0, "no feature is active: the test would prove nothing"
    if arch == "topk":
        assert ((got > 0).sum(-1) <= 8).all()
        ranked = -np.sort(-pre_activations(h, t, kind != "legacy_topk", kind == "topk_rescaled"), axis=-1)
        assert (ranked[..., 7] - ranked[..., 8] > 1e-4).all(), "a near-tie at the k-th feature: choose another seed"
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    sae = load_sae(tmp_path / "sae")
    assert (sae.architecture, sae.d_in, sae.d_sae, sae.hook_name, sae.site) == (arch, 128, D_SAE, "blocks.3.hook_resid_post", "h.3")


def test_capture_at_last_keeps_the_last_position_only(llama, tmp_path):
    model, _ = llama
    t = write_sae(tmp_path / "sae", "jumprelu")
    inputs = batch()
    inj = garage.compile(model, f'at h.3[last] sae "{tmp_path / "sae"}" capture feats')
    with torch.no_grad():
        inj(**inputs)
    want = encode(state_at(model, inputs, "model.layers.3"), t, "jumprelu")
    got = inj.captures["feats"].double()
    assert not got[:, :-1].any()
    torch.testing.assert_close(got[:, -1], want[:, -1], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ edits
EDITS = [("add", 3.0), ("clamp", 4.0), ("zero", 0.0), ("scale", 2.5)]


def spell(action: str, x: float) -> str:
    return "zero" if action == "zero" else f"{action} {x:g}"


@pytest.mark.parametrize("action, x", EDITS)
@pytest.mark.parametrize("where", ["h.3", "h.3[last]"])
def test_each_edit_at_a_block_output(llama, tmp_path, action, x, where):
    model, _ = llama
    t = write_sae(tmp_path / "sae")
    inputs = batch()
    inj = garage.compile(model, f'at {where} sae "{tmp_path / "sae"}" feature {{5, 17, 200}} {spell(action, x)}')
    with torch.no_grad():
        got = inj(**inputs).logits
    formula = edited(t, action, x)
    want = run_with(model, inputs, "model.layers.3", last_only(formula) if "last" in where else formula)
    plain = run_with(model, inputs, "model.layers.3", lambda h: h)
    assert not torch.allclose(want, plain, atol=1e-3), "the edit changed nothing: the test would prove nothing"
    assert_logits(got, want, inputs["attention_mask"])


@pytest.mark.parametrize("action, x", EDITS)
def test_each_edit_of_a_jumprelu_sae_at_an_mlp_output_by_both_backends(llama, tmp_path, action, x):
    """A JumpReLU SAE at h.2.mlp (hook_mlp_out: the MLP's output before the residual add), one feature, by
    the graph and by forward hooks."""
    model, _ = llama
    inputs = batch()
    spread = float(state_at(model, inputs, "model.layers.2.mlp").std())
    t = write_sae(tmp_path / "sae", "jumprelu", "blocks.2.hook_mlp_out", scale=spread)
    spec = f'at h.2.mlp sae "{tmp_path / "sae"}" feature 17 {spell(action, x)}'
    want = run_with(model, inputs, "model.layers.2.mlp", edited(t, action, x, (17,), "jumprelu"))
    with torch.no_grad():
        assert_logits(garage.compile(model, spec)(**inputs).logits, want, inputs["attention_mask"])
        hooks, _ = garage.hook(model, spec)
        with hooks:
            assert_logits(model(**inputs).logits, want, inputs["attention_mask"])
    assert not garage.check(model, spec).warnings  # trained where it is used: no sae-site warning


def test_generation_with_an_edit_at_last_matches_a_hook(llama, tmp_path):
    """Each step's last position is the token being fed: the test's own hook under model.generate."""
    model, _ = llama
    t = write_sae(tmp_path / "sae")
    inputs = batch()
    inj = garage.compile(model, f'at h.3[last] sae "{tmp_path / "sae"}" feature {{5, 17}} clamp 40')
    got = inj.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4, do_sample=False)
    formula = last_only(edited(t, "clamp", 40.0, (5, 17)))

    def hook(_m: nn.Module, _args: tuple, out: object) -> object:
        return (formula(out[0]), *out[1:]) if isinstance(out, tuple) else formula(out)  # type: ignore[arg-type]

    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=98)
    handle = model.model.layers[3].register_forward_hook(hook)
    try:
        want = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=98)
    finally:
        handle.remove()
    assert not torch.equal(want, plain), "the edit changed no token: the test would prove nothing"
    assert torch.equal(got, want)


def test_a_bound_sae_is_used_and_never_changed(llama, tmp_path):
    model, _ = llama
    t = write_sae(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae").double()  # another dtype than the model's: garage uses a copy
    before = sae.W_dec.clone()
    inputs = batch()
    with torch.no_grad():
        got = garage.compile(model, "at h.3 sae res feature 17 zero", bind={"res": sae})(**inputs).logits
    assert_logits(got, run_with(model, inputs, "model.layers.3", edited(t, "zero", 0.0, (17,))), inputs["attention_mask"])
    assert sae.W_dec.dtype == torch.float64 and torch.equal(sae.W_dec, before)


def test_x_is_a_buffer_and_edits_take_conditions(llama, tmp_path):
    model, _ = llama
    t = write_sae(tmp_path / "sae")
    inputs, mask = batch(), batch()["attention_mask"]
    inj = garage.compile(model, f'at h.3 sae "{tmp_path / "sae"}" feature {{5, 17}} clamp 4')
    inj.ops[0].amount.fill_(9.0)  # no retrace: the graph reads the buffer
    with torch.no_grad():
        assert_logits(inj(**inputs).logits, run_with(model, inputs, "model.layers.3", edited(t, "clamp", 9.0, (5, 17))), mask)
    v = torch.ones(128)
    for threshold, formula in ((-2, edited(t, "zero", 0.0, (17,))), (2, lambda h: h)):  # cosine: always, never
        spec = f'at h.3 sae "{tmp_path / "sae"}" feature 17 zero when h.1 @ v > {threshold}'
        with torch.no_grad():
            got = garage.compile(model, spec, bind={"v": v})(**inputs).logits
        assert_logits(got, run_with(model, inputs, "model.layers.3", formula), mask)


def test_capture_during_generation_keeps_every_step(llama, tmp_path):
    model, _ = llama
    t = write_sae(tmp_path / "sae")
    inputs = batch()
    inj = garage.compile(model, f'at h.3 sae "{tmp_path / "sae"}" capture feats')
    tokens = inj.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=3, do_sample=False)
    got = inj.captures["feats"]
    assert got.shape == (3, 9 + 2, D_SAE)  # the prompt, then each token fed back (the last one is not)
    fed = {"input_ids": tokens[:, :-1], "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(3, 2, dtype=torch.long)], 1)}
    want = encode(state_at(model, fed, "model.layers.3"), t)
    real = fed["attention_mask"].bool()
    torch.testing.assert_close(got.double()[real], want[real], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ checks
def diagnostics(model: nn.Module, spec: Path, text: str, **bind: object) -> list[garage.Diagnostic]:
    spec.write_text(text)
    return garage.check(model, spec, bind=bind).diagnostics


def test_checker_errors_at_their_spans(llama, tmp_path):
    model, _ = llama
    write_sae(tmp_path / "res")
    write_sae(tmp_path / "small", d_in=64)
    write_sae(tmp_path / "gated", "gated")
    write_sae(tmp_path / "normed", normalize_activations="layer_norm")
    text = ('at h.3 sae "small" feature 1 zero\n'            # relative to the spec's folder
            'at h.3 sae "res" feature {3, 400} zero\n'
            'at h.3 sae "res" feature 256 add 1\n'
            'at h.3 sae "missing" capture m\n'
            'at h.3 sae "gated" capture g\n'
            'at h.3 sae "normed" capture n\n'
            'at h.3.attn.heads sae "res" capture h\n'
            'at h.3 sae vec capture v\n')
    found = diagnostics(model, tmp_path / "s.garage", text, vec=torch.zeros(128))
    got = [(d.line, d.column, d.end_column, d.message, d.hint) for d in found if d.is_error]
    assert [g[:3] for g in got] == [(1, 12, 19), (2, 30, 33), (3, 26, 29), (4, 12, 21), (5, 12, 19), (6, 12, 20),
                                    (7, 19, 38), (8, 12, 15)]
    messages = [g[3] for g in got]
    assert messages[0] == "SAE small has d_in 64, but this model's hidden size is 128"
    assert messages[1] == "feature 400 is out of range: SAE res has 256 features (0..255)"
    assert messages[2] == "feature 256 is out of range: SAE res has 256 features (0..255)"
    assert messages[3] == "SAE folder not found: missing" and f"looked for {tmp_path / 'missing'}" in got[3][4]
    assert messages[4] == "SAE gated: this SAE's architecture is 'gated'" and "standard, jumprelu or topk" in got[4][4]
    assert "normalises its input ('layer_norm')" in messages[5] and 'normalize_activations "none"' in got[5][4]
    assert "split into heads" in messages[6]
    assert messages[7] == "'vec' is bound to a Tensor, not an SAE"


def test_sae_site_warns_where_the_sae_was_not_trained(llama, tmp_path):
    model, _ = llama
    write_sae(tmp_path / "res")  # trained at blocks.3.hook_resid_post: h.3
    write_sae(tmp_path / "odd", hook="blocks.3.hook_resid_mid")
    text = ('at h.3[last] sae "res" capture ok\n'
            'at h.5 sae "res" feature 3 zero\n'
            'at h.3.in sae "res" capture pre\n'
            'at h.3 sae "odd" capture odd\n')
    found = diagnostics(model, tmp_path / "s.garage", text)
    assert not [d for d in found if d.is_error]
    got = [(d.line, d.column, d.rule, d.message) for d in found]
    assert got == [
        (2, 1, "sae-site", "this SAE was trained at blocks.3.hook_resid_post (h.3) but is used at h.5"),
        (3, 1, "sae-site", "this SAE was trained at blocks.3.hook_resid_post (h.3) but is used at h.3.in"),
        (4, 1, "sae-site", "this SAE was trained at blocks.3.hook_resid_mid, a hook garage cannot match to a site"),
    ]


def test_hook_names_map_to_sites():
    assert [site_label(f"blocks.6.{hook}") for hook in ("hook_resid_post", "hook_resid_pre", "hook_attn_out",
                                                        "hook_mlp_out", "attn.hook_z")] == ["h.6", "h.6.in", "h.6.attn", "h.6.mlp", None]


# ------------------------------------------------------------------ the language
@pytest.mark.parametrize("text", [
    'at h.3 sae "saes/res" feature 12 add 2',
    "at h.3[last] sae res feature {40, 12, 13, 14, 12} clamp -3.5",
    'at h.2.mlp sae "a b/c" feature {3} zero',
    "at h.6 sae res feature {0..2, 9} scale 0.5 when h.4 @ v > 0.1",
    'at h.6 sae "saes/res" capture feats',
])
def test_formatting_round_trips(text):
    spec = garage.parse(text)
    assert garage.parse(garage.format(spec)) == spec
    assert garage.format(garage.parse(garage.format(spec))) == garage.format(spec)


def test_canonical_spelling():
    got = garage.format(garage.parse("at 3[last] sae res feature {40, 12, 13, 14} clamp -3.50; at h.1 sae r feature {7} zero"))
    assert got == "at h.3[last] sae res feature {12..14, 40} clamp -3.5\nat h.1 sae r feature 7 zero\n"


def test_a_bad_edit_names_what_is_expected():
    with pytest.raises(garage.SpecError) as err:
        garage.parse("at h.3 sae res feature 3 clamp")
    assert "expected a number" in str(err.value)
    with pytest.raises(garage.SpecError) as err:
        garage.parse("at h.3 sae res feature 3 ablate")
    assert "'add', 'clamp', 'scale', 'zero'" in str(err.value)


# ------------------------------------------------------------------ garage sae top
def reference_top(model: nn.Module, tokenizer: object, t: dict[str, torch.Tensor], prompt: str, k: int) -> list[list[tuple[int, float]]]:
    inputs = dict(tokenizer([prompt], return_tensors="pt"))  # type: ignore[operator]
    acts = encode(state_at(model, inputs, "model.layers.3"), t)[0].numpy()
    rows = []
    for row in acts:
        order = np.argsort(-row)[:k]
        rows.append([(int(f), float(row[f])) for f in order if row[f] > 0])
    return rows


def test_sae_top_json_and_text(llama, tmp_path, capsys):
    model, tokenizer = llama
    t = write_sae(tmp_path / "res")
    prompt = "the sea is calm"
    want = reference_top(model, tokenizer, t, prompt, 3)
    assert main(["sae", "top", "--model", "tiny:llama", "--sae", str(tmp_path / "res"), "--prompt", prompt, "-k", "3",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["site"], got["k"], got["d_sae"], got["hook_name"]) == ("h.3", 3, D_SAE, "blocks.3.hook_resid_post")
    assert [tok["token"] for tok in got["tokens"]] == [tokenizer.decode([i]) for i in tokenizer(prompt)["input_ids"]]
    assert len(got["tokens"]) == len(want)
    for tok, expected in zip(got["tokens"], want):
        assert [f["feature"] for f in tok["features"]] == [f for f, _ in expected]
        assert [f["activation"] for f in tok["features"]] == pytest.approx([a for _, a in expected], rel=1e-4, abs=1e-5)
    assert main(["sae", "top", "--model", "tiny:llama", "--sae", str(tmp_path / "res"), "--prompt", prompt, "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"== {D_SAE} features of {tmp_path / 'res'}, trained at blocks.3.hook_resid_post, read at h.3")
    for line, expected in zip(lines[1:], want):
        assert [int(part.split(":")[0]) for part in line.split("  ")[2:] if ":" in part] == [f for f, _ in expected]


def test_sae_top_at_another_site_and_without_a_known_hook(llama, tmp_path, capsys):
    model, tokenizer = llama
    write_sae(tmp_path / "odd", hook="blocks.3.hook_resid_mid")
    assert main(["sae", "top", "--model", "tiny:llama", "--sae", str(tmp_path / "odd"), "--prompt", "hi"]) == 2
    assert "names no site garage knows" in capsys.readouterr().err
    assert main(["sae", "top", "--model", "tiny:llama", "--sae", str(tmp_path / "odd"), "--prompt", "hi",
                 "--site", "h.3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["site"] == "h.3"
    assert main(["sae", "top", "--model", "tiny:llama", "--sae", str(tmp_path / "nope")]) == 2
    assert "SAE folder not found" in capsys.readouterr().err
    write_sae(tmp_path / "res")
    assert main(["sae", "top", "--model", "tiny:llama", "--sae", str(tmp_path / "res"), "--site", "3.mlp"]) == 0
    out = capsys.readouterr()
    assert "warning: this SAE was trained at blocks.3.hook_resid_post (h.3), not at h.3.mlp [sae-site]" in out.err
    assert "read at h.3.mlp of tiny:llama" in out.out
    assert main(["sae", "top", "--model", "tiny:llama", "--sae", str(tmp_path / "res"), "--site", "h.*"]) == 2
    assert "names 8 sites: name one" in capsys.readouterr().err
