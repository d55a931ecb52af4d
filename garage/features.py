"""The SAE features a prompt lights up: for each token, the k most active features of an SAE at a site
(`garage sae top`).

The activations are read by the very op a spec's `sae … capture` runs, through forward hooks (nothing is
traced), so what this lists is what a spec at that site would see and edit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .compiler import hook
from .sae import SAE, load_sae

BOUND = "features_of"  # the name the SAE is bound to in the spec that reads it


@dataclass(frozen=True)
class TokenFeatures:
    """One token of the prompt: its position, its text, and its most active features (feature, activation),
    most active first; features that are not active (activation 0) are left out."""

    position: int
    token: str
    features: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TopFeatures:
    """What `top_features` found: the site it read (canonical label), the SAE, and one entry a token.
    `elsewhere` says so when the SAE's config records another site than the one read (the `sae-site` rule)."""

    site: str
    sae: SAE
    k: int
    tokens: tuple[TokenFeatures, ...]
    elsewhere: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"site": self.site, "sae": self.sae.source, "hook_name": self.sae.hook_name, "d_sae": self.sae.d_sae,
                "k": self.k, "tokens": [{"position": t.position, "token": t.token,
                                         "features": [{"feature": f, "activation": a} for f, a in t.features]}
                                        for t in self.tokens]}


def default_site(sae: SAE) -> str:
    """The site an SAE's config says it was trained at; a ValueError when its hook names none of garage's."""
    if sae.site is None:
        raise ValueError(f"this SAE's hook_name {sae.hook_name!r} names no site garage knows: give the site "
                         "(garage sae top --site h.6)")
    return sae.site


@torch.no_grad()
def top_features(model: nn.Module, tokenizer: Any, sae: SAE | str | os.PathLike[str], prompt: str,
                 site: str | None = None, k: int = 5) -> TopFeatures:
    """Per token of `prompt`, the k features of `sae` (an SAE, or an SAELens folder) most active at `site`
    (by default the site its hook_name names: `blocks.6.hook_resid_post` is h.6)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    sae = sae if isinstance(sae, SAE) else load_sae(sae)
    where = site or default_site(sae)
    hooks, prepared = hook(model, f"at {where} sae {BOUND} capture features", bind={BOUND: sae})
    if len(prepared.plan.steps) != 1:
        hooks.remove()
        raise ValueError(f"{where} names {len(prepared.plan.steps)} sites: name one, such as h.6")
    inputs = tokenizer([prompt], return_tensors="pt")
    with hooks:
        model(**inputs)
    acts = prepared.captures["features"][0].float()  # [seq, d_sae]
    values, indices = acts.topk(min(k, sae.d_sae), dim=-1)
    ids = inputs["input_ids"][0].tolist()
    tokens = tuple(
        TokenFeatures(p, tokenizer.decode([ids[p]]),
                      tuple((int(f), float(a)) for f, a in zip(indices[p].tolist(), values[p].tolist()) if a > 0))
        for p in range(len(ids)))
    read = prepared.plan.steps[0].site
    elsewhere = None
    if sae.trained_at is not None and sae.trained_at != (read.kind, read.layer):
        elsewhere = f"this SAE was trained at {sae.hook_name} ({sae.site}), not at {read.label}"
    return TopFeatures(read.label, sae, k, tokens, elsewhere)
