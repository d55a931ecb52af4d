"""Activation capture and effect analysis: what a spec changes, layer by layer.

`capture` records hidden states by site name (through hooks, so nothing is traced). `layer_stats`
summarises a tensor. `compare` runs the model with and without a spec and reports, per block, the
cosine similarity and L2 distance between the two residual streams, over real (unpadded) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch
from torch import nn

from . import ops
from .compiler import SpecLike, hook
from .plan.archs import ModelInfo
from .plan.prepare import sites_named
from .runtime.hooks import HookSet, attach

Inputs = Union[Mapping[str, torch.Tensor], torch.Tensor]  # tokenizer output, or input_ids alone


def _inputs(inputs: Inputs) -> dict[str, torch.Tensor]:
    return {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)


@torch.no_grad()
def capture(model: nn.Module, sites: str | Sequence[str], inputs: Inputs, spec: SpecLike = "",
            bind: Mapping[str, object] | None = None) -> dict[str, torch.Tensor]:
    """Hidden states at each site ("h.*", "h.6.mlp", "final", …), keyed by canonical site label.

    With `spec`, its ops apply first (captures at a site come after the spec's ops there).
    """
    info = ModelInfo.from_model(model)
    targets = [site for text in ([sites] if isinstance(sites, str) else sites) for site in sites_named(info, text)]
    store: dict[str, torch.Tensor] = {}
    recorders = [ops.Capture(store, site.label) for site in targets]
    spec_hooks = hook(model, spec, bind)[0] if spec != "" else HookSet(model)
    with spec_hooks, attach(model, targets, recorders):  # attached after the spec's: they see its effect
        model(**_inputs(inputs))
    return {site.label: store[site.label] for site in targets}


def layer_stats(h: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """mean, std, min, max, sparsity (share of |x| < 1e-6) and entropy (nats, of softmax over hidden, per token)."""
    x = h.float()
    if mask is not None and x.dim() == 3:
        x = x[mask.bool()]
    x = x.reshape(-1, x.shape[-1])
    probs = x.softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    return {
        "mean": x.mean().item(),
        "std": x.std().item() if x.numel() > 1 else 0.0,
        "min": x.min().item(),
        "max": x.max().item(),
        "sparsity": (x.abs() < 1e-6).float().mean().item(),
        "entropy": entropy.item(),
    }


@dataclass(frozen=True)
class LayerEffect:
    site: str
    cosine: float  # mean over real tokens of cos(h_spec, h_plain)
    l2: float  # mean over real tokens of ‖h_spec − h_plain‖


@torch.no_grad()
def compare(model: nn.Module, spec: SpecLike, inputs: Inputs, bind: Mapping[str, object] | None = None,
            sites: Sequence[str] | None = None) -> list[LayerEffect]:
    """Per site (by default each block's output and the final norm where there is one): how far the spec
    moves it. Any sites work, e.g. `["h.*.mlp.hidden"]`."""
    tensors = _inputs(inputs)
    mask = tensors.get("attention_mask")
    if sites is None:
        sites = ["h.*"] + (["final"] if _has_final(model) else [])
    plain = capture(model, sites, tensors)
    steered = capture(model, sites, tensors, spec=spec, bind=bind)
    effects = []
    for label, a in steered.items():
        b = plain[label]
        if mask is not None and a.dim() == 3:
            a, b = a[mask.bool()], b[mask.bool()]
        a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
        effects.append(LayerEffect(label, cosine, (a - b).norm(dim=-1).mean().item()))
    return effects


def _has_final(model: nn.Module) -> bool:
    return ModelInfo.from_model(model).final_norm is not None


def effect_table(effects: Sequence[LayerEffect], width: int = 30) -> str:
    """A table a person can read: cosine, L2, and a bar of 1 − cosine (how much the direction changed)."""
    most = max((1 - e.cosine for e in effects), default=0.0) or 1.0
    column = max([8, *(len(e.site) for e in effects)])
    rows = [f"{'site':{column}} {'cosine':>8} {'L2':>10}  change"]
    for e in effects:
        bar = "█" * round(width * (1 - e.cosine) / most) if e.cosine < 1 - 1e-7 else ""
        rows.append(f"{e.site:{column}} {e.cosine:8.4f} {e.l2:10.4f}  {bar}")
    return "\n".join(rows)
