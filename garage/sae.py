"""Sparse autoencoders (SAEs) in SAELens's on-disk format: a folder with `cfg.json` and
`sae_weights.safetensors`, read without executing code, into an `SAE` module that encodes and decodes
exactly as SAELens's inference classes do (`sae_lens/saes/standard_sae.py`, `jumprelu_sae.py`,
`topk_sae.py`):

    encode(x) = σ((x − b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc)       decode(a) = a @ W_dec + b_dec

σ is ReLU (architecture "standard"), ReLU kept only where the pre-activation exceeds `threshold`
("jumprelu"), or ReLU of the k largest pre-activations, zero elsewhere ("topk"; with
`rescale_acts_by_decoder_norm`, pre-activations are scaled by ‖W_dec[f]‖ before the top k are taken, and
activations divided by it again in decode). Anything else SAELens can hold (gated SAEs, transcoders,
input normalisation, hook_z reshaping, a fine-tuning scale) is refused with what garage reads, so that a
spec never runs an SAE that computes something other than what was trained.

Both SAELens ≥ 6 configs (hook and model under `metadata`, `k` at the top level) and older ones (a flat
`hook_name` or `hook_point`, `activation_fn_str` with `activation_fn_kwargs.k`) are read, as SAELens's own
`handle_pre_6_0_config` reads them. Stage: below every pipeline stage; it imports nothing from garage.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch
from torch import nn

CFG_FILE = "cfg.json"  # SAELens's SAE_CFG_FILENAME and SAE_WEIGHTS_FILENAME (sae_lens/constants.py)
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "jumprelu", "topk")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_CFG_BYTES = 1 << 20
MAX_ELEMENTS = 1 << 32  # per tensor: far beyond the widest published SAEs (1M features × 4608)
SUPPORTED = "garage reads SAELens SAEs of architecture standard, jumprelu or topk, with normalize_activations \"none\""

# TransformerLens hook names → garage sites (docs/language.md, "SAE features"): the residual stream after
# and before block L, and attention's and the MLP's outputs before their residual add.
_HOOK = re.compile(r"blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_attn_out|hook_mlp_out)")
_KIND = {"hook_resid_post": "out", "hook_resid_pre": "in", "hook_attn_out": "attn", "hook_mlp_out": "mlp"}


class SaeProblem(ValueError):
    """An SAE folder garage cannot use; `message` says why and `hint` how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message} ({hint})")
        self.message, self.hint = message, hint


def hook_site(hook_name: str | None) -> tuple[str, int] | None:
    """(site kind, layer) of a TransformerLens hook name: `blocks.6.hook_resid_post` → ("out", 6), that is
    h.6; `hook_resid_pre` → h.L.in, `hook_attn_out` → h.L.attn, `hook_mlp_out` → h.L.mlp. None for others."""
    found = _HOOK.fullmatch(hook_name or "")
    return (_KIND[found.group(2)], int(found.group(1))) if found else None


def site_label(hook_name: str | None) -> str | None:
    """The garage site a hook name names, as written in specs (`h.6`, `h.6.in`, …); None if there is none."""
    site = hook_site(hook_name)
    if site is None:
        return None
    kind, layer = site
    return f"h.{layer}" + ("" if kind == "out" else f".{kind}")


class SAE(nn.Module):
    """An SAE's tensors (buffers, so that a graph holding the module holds them) and its encode/decode.

    `source` is the folder it was read from, `hook_name` and `model_name` what its config records."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
                 architecture: str = "standard", threshold: torch.Tensor | None = None, k: int | None = None,
                 apply_b_dec_to_input: bool = True, rescale_acts_by_decoder_norm: bool = False,
                 hook_name: str | None = None, model_name: str | None = None, source: str | None = None) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise SaeProblem(f"architecture {architecture!r} is not supported", SUPPORTED)
        if (architecture == "jumprelu") != (threshold is not None):
            raise SaeProblem("a jumprelu SAE needs a threshold, and only it has one")
        if (architecture == "topk") != (k is not None):
            raise SaeProblem("a topk SAE needs k, and only it has one")
        for name, tensor in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec),
                             ("threshold", threshold if threshold is not None else torch.zeros(0))):
            self.register_buffer(name, tensor)
        self.architecture, self.k = architecture, k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.rescale_acts_by_decoder_norm = rescale_acts_by_decoder_norm
        self.hook_name, self.model_name, self.source = hook_name, model_name, source

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def site(self) -> str | None:
        """The garage site its hook name names (`h.6`), or None."""
        return site_label(self.hook_name)

    @property
    def trained_at(self) -> tuple[str, int] | None:
        """(site kind, layer) of the site its hook name names, or None."""
        return hook_site(self.hook_name)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] → [..., d_sae] feature activations."""
        pre = self._input(x) @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        if self.architecture == "topk":
            assert self.k is not None
            if self.rescale_acts_by_decoder_norm:
                pre = pre * self.W_dec.norm(dim=-1)
            values, indices = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        return pre.relu()

    def encode_features(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """[..., d_in] → [..., len(index)]: the activations of the features `index` names, as `encode` gives
        them. Only a TopK SAE needs every pre-activation (to rank them); the others compute just these."""
        if self.architecture == "topk":
            return self.encode(x).index_select(-1, index)
        pre = self._input(x) @ self.W_enc.index_select(1, index) + self.b_enc.index_select(0, index)
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold.index_select(0, index)).to(pre.dtype)
        return pre.relu()

    def directions(self, index: torch.Tensor) -> torch.Tensor:
        """[len(index), d_in]: what one unit of each feature's activation adds to decode (∂decode/∂a_f):
        its decoder row, divided by the row's norm where the SAE rescales activations by it."""
        rows = self.W_dec.index_select(0, index)
        return rows / rows.norm(dim=-1, keepdim=True) if self.rescale_acts_by_decoder_norm else rows

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] → [..., d_in]."""
        if self.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        return acts @ self.W_dec + self.b_dec

    def extra_repr(self) -> str:
        return (f"{self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}"
                + (f", k={self.k}" if self.k is not None else "") + (f", hook_name={self.hook_name!r}" if self.hook_name else ""))


# ------------------------------------------------------------------ reading a folder
def _regular(path: Path, shown: str) -> os.stat_result:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SaeProblem(f"{shown} not found", f"looked for {path}") from None
    except OSError as err:
        raise SaeProblem(f"cannot read {shown}: {err.strerror or err}", "check the path and its permissions") from None
    if not stat.S_ISREG(info.st_mode):
        raise SaeProblem(f"{shown} is not a regular file", f"an SAE folder holds {CFG_FILE} and {WEIGHTS_FILE}")
    return info


def _read_cfg(folder: Path) -> dict[str, Any]:
    path = folder / CFG_FILE
    if _regular(path, CFG_FILE).st_size > MAX_CFG_BYTES:
        raise SaeProblem(f"{CFG_FILE} is larger than {MAX_CFG_BYTES:,} bytes", "an SAE's config is a small JSON object")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SaeProblem(f"{CFG_FILE} is not readable JSON ({err})", "save the SAE again with SAELens (sae.save_model)") from None
    if not isinstance(cfg, dict):
        raise SaeProblem(f"{CFG_FILE} holds a {type(cfg).__name__}, not a JSON object", "save the SAE again with SAELens")
    return cfg


def _size(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SaeProblem(f"{CFG_FILE}: {key} must be a positive integer, got {value!r}", "save the SAE again with SAELens")
    return value


def _object(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    value = cfg.get(key)
    return value if isinstance(value, dict) else {}


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What garage needs of a config, in SAELens ≥ 6 terms, or SaeProblem naming what it cannot run."""
    meta = _object(cfg, "metadata")  # SAELens ≥ 6; older configs are flat
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str"))  # SAELens < 6
    kwargs = _object(cfg, "activation_fn_kwargs")
    architecture = cfg.get("architecture", "standard")
    if activation == "topk" and kwargs.get("k") is not None:
        architecture = "topk"  # as SAELens's handle_pre_6_0_config decides
    if architecture not in ARCHITECTURES:
        raise SaeProblem(f"this SAE's architecture is {architecture!r}", SUPPORTED)
    if activation not in (None, "relu", "topk") or (activation is not None and (activation == "topk") != (architecture == "topk")):
        raise SaeProblem(f"this SAE's activation function is {activation!r} under architecture {architecture!r}", SUPPORTED)
    norm = cfg.get("normalize_activations")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)
    if norm != "none":
        fold = ("; fold its scaling factor into the weights (SAELens: fold_activation_norm_scaling_factor) and save "
                "it again" if norm == "expected_average_only_in" else "")
        raise SaeProblem(f"this SAE normalises its input ({norm!r}), which garage does not do", SUPPORTED + fold)
    hook_name = meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    if cfg.get("reshape_activations", "none") != "none" or str(hook_name or "").endswith("hook_z"):
        raise SaeProblem("this SAE reads attention heads' outputs (hook_z), which garage does not support", SUPPORTED)
    if cfg.get("finetuning_scaling_factor"):
        raise SaeProblem("this SAE scales its activations by a fine-tuned factor, which garage does not support", SUPPORTED)
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype not in DTYPES:
        raise SaeProblem(f"{CFG_FILE}: unknown dtype {cfg.get('dtype')!r}", f"one of {', '.join(DTYPES)}")
    k = cfg.get("k", kwargs.get("k")) if architecture == "topk" else None
    d_sae = _size(cfg, "d_sae")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae):
        raise SaeProblem(f"{CFG_FILE}: k must be an integer in 1..d_sae ({d_sae}), got {k!r}")
    if architecture == "topk" and k is None:
        raise SaeProblem(f"{CFG_FILE}: a topk SAE needs k", "SAELens ≥ 6 writes it as \"k\"")
    model_name = meta.get("model_name", cfg.get("model_name"))
    return {"d_in": _size(cfg, "d_in"), "d_sae": d_sae, "architecture": architecture, "k": k, "dtype": DTYPES[dtype],
            "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
            "rescale_acts_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm", False)),
            "hook_name": str(hook_name) if hook_name is not None else None,
            "model_name": str(model_name) if model_name is not None else None}


def _read_weights(folder: Path, settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The SAE's tensors, each checked against the config's shapes in the file's header before it is read."""
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_FILE
    _regular(path, WEIGHTS_FILE)
    d_in, d_sae = settings["d_in"], settings["d_sae"]
    wanted = {"W_enc": [d_in, d_sae], "b_enc": [d_sae], "W_dec": [d_sae, d_in], "b_dec": [d_in]}
    if settings["architecture"] == "jumprelu":
        wanted["threshold"] = [d_sae]
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            for name, shape in wanted.items():
                if name not in names:
                    raise SaeProblem(f"{WEIGHTS_FILE} has no tensor {name!r}", f"it holds: {', '.join(sorted(names)) or 'none'}")
                found = list(f.get_slice(name).get_shape())
                if found != shape or math.prod(found) > MAX_ELEMENTS:
                    raise SaeProblem(f"{WEIGHTS_FILE}: {name} has shape {found}, but d_in {d_in} and d_sae {d_sae} "
                                     f"in {CFG_FILE} make it {shape}", "the config and the weights must come from one SAE")
                tensors[name] = f.get_tensor(name)
            if "scaling_factor" in names and not torch.all(f.get_tensor("scaling_factor") == 1):
                raise SaeProblem("this SAE scales its activations by a fine-tuned factor, which garage does not support",
                                 SUPPORTED)
    except (SafetensorError, OSError) as err:
        raise SaeProblem(f"{WEIGHTS_FILE} is not a readable safetensors file ({err})", "save the SAE again with SAELens") from None
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise SaeProblem(f"{WEIGHTS_FILE}: {name} holds {str(tensor.dtype).replace('torch.', '')} values, not floats")
    return {name: tensor.to(settings["dtype"]) for name, tensor in tensors.items()}  # as SAELens casts to cfg dtype


def load_sae(path: str | os.PathLike[str], shown: str | None = None) -> SAE:
    """The SAE in an SAELens folder (`cfg.json` + `sae_weights.safetensors`), on the CPU in its config's
    dtype. Raises SaeProblem (a ValueError) with a hint when the folder cannot be read or the SAE is one
    garage does not run; its message names the folder as `shown` (as a spec wrote it), else as `path`."""
    folder = Path(path).expanduser()
    shown = shown or os.fspath(path)
    if not folder.is_dir():
        where = f"looked for {folder.resolve()}; " if not folder.exists() else ""
        raise SaeProblem(f"SAE folder not found: {shown}" if not folder.exists() else f"{shown} is not a folder",
                         f"{where}an SAE is a folder holding {CFG_FILE} and {WEIGHTS_FILE} (SAELens's sae.save_model "
                         "writes one)")
    try:
        settings = _settings(_read_cfg(folder))
        weights = _read_weights(folder, settings)
    except SaeProblem as problem:
        raise SaeProblem(f"SAE {shown}: {problem.message}", problem.hint) from None
    return SAE(weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"],
               architecture=settings["architecture"], threshold=weights.get("threshold"), k=settings["k"],
               apply_b_dec_to_input=settings["apply_b_dec_to_input"],
               rescale_acts_by_decoder_norm=settings["rescale_acts_by_decoder_norm"],
               hook_name=settings["hook_name"], model_name=settings["model_name"], source=os.fspath(path))
