"""Steering vectors made from prompts: contrastive activation addition (ActAdd, Turner et al. 2023; CAA,
Rimsky et al. 2024).

`contrast` runs the model on positive and negative prompts and returns the difference of their mean
hidden states at one site. `save` writes it as safetensors with metadata that the checker reads: a vector
made on another model type, or at another layer than the one a spec adds it at, is warned about; one
of another hidden size is an error.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .analyze import capture
from .plan.archs import ModelInfo
from .plan.prepare import sites_named
from .plan.resolve import ConcreteSite

Reduce = Literal["mean", "last"]
Prompts = Sequence[str] | Sequence[tuple[str, str]]
KEY = "vector"  # the tensor's name in a saved file


def one_site(model: nn.Module, site: str) -> ConcreteSite:
    """The one concrete site that `site` names on this model (a ValueError when it names several)."""
    sites = sites_named(ModelInfo.from_model(model), site)
    if len(sites) != 1:
        raise ValueError(f"{site!r} names {len(sites)} sites; a steering vector is made at one")
    return sites[0]


@torch.no_grad()
def states(model: nn.Module, tokenizer: Any, prompts: Sequence[str], site: str = "h.10",
           reduce: Reduce = "mean", batch_size: int = 8) -> torch.Tensor:
    """[len(prompts), hidden]: each prompt's hidden state at the site, the mean over its real tokens or
    its last real token. Padding never counts."""
    if reduce not in ("mean", "last"):
        raise ValueError(f"reduce must be 'mean' or 'last', not {reduce!r}")
    label = one_site(model, site).label
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        h = capture(model, label, inputs)[label].float()
        h = h.reshape(mask.shape[0], mask.shape[1], -1)  # OPT's MLP site is flat [batch*seq, hidden]
        if reduce == "mean":
            weights = mask.to(h.dtype)[..., None]
            rows.append((h * weights).sum(1) / weights.sum(1).clamp_min(1))
        else:
            last = mask.shape[1] - 1 - mask.flip(-1).to(torch.long).argmax(-1)  # the last real token
            rows.append(h[torch.arange(h.shape[0], device=h.device), last])
    return torch.cat(rows).cpu()


def contrast(model: nn.Module, tokenizer: Any, positive: Prompts, negative: Sequence[str] | None = None,
             site: str = "h.10", reduce: Reduce = "mean", batch_size: int = 8) -> torch.Tensor:
    """A [hidden] steering vector: mean state of the positive prompts minus that of the negative ones.

    `positive` and `negative` are lists of prompts, or `positive` is a list of (positive, negative) pairs
    and `negative` is left out."""
    if negative is None:
        pairs = [tuple(p) for p in positive]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError("without `negative`, `positive` must be a non-empty list of (positive, negative) pairs")
        pos, neg = [str(p[0]) for p in pairs], [str(p[1]) for p in pairs]
    else:
        pos, neg = [str(p) for p in positive], [str(n) for n in negative]
    if not pos or not neg:
        raise ValueError("give at least one positive and one negative prompt")
    ahead = states(model, tokenizer, pos, site, reduce, batch_size).mean(0)
    behind = states(model, tokenizer, neg, site, reduce, batch_size).mean(0)
    return ahead - behind


def metadata(model: nn.Module, site: str, prompts: int, reduce: Reduce) -> dict[str, str]:
    """What a saved vector records of how it was made: what the checker compares with its use."""
    info, where = ModelInfo.from_model(model), one_site(model, site)
    return {"model_type": info.model_type, "hidden_size": str(info.hidden_size), "site": where.label,
            "layer": "" if where.layer is None else str(where.layer), "num_layers": str(info.num_layers),
            "prompts": str(prompts), "reduce": reduce}


def save(path: str | os.PathLike[str], vector: torch.Tensor, **meta: object) -> str:
    """Write `vector` as safetensors (tensor "vector") with `meta` as its metadata, plus its hidden size,
    its kind and the garage version; returns the path."""
    if vector.dim() != 1:
        raise ValueError(f"a steering vector is one [hidden] vector, not shape {list(vector.shape)}")
    recorded = {"kind": "steering-vector", "hidden_size": str(vector.shape[0]), "garage_version": __version__}
    recorded.update({key: str(value) for key, value in meta.items() if value is not None})
    save_file({KEY: vector.detach().float().contiguous().cpu()}, os.fspath(path), metadata=recorded)
    return os.fspath(path)
