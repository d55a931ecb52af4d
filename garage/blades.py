"""Blades made from a source model: its hidden state at one site, recorded on domain prompts (the practical
recipe of the Blades research), saved as safetensors with the metadata that the checker reads.

A blade file records where and how it was made: the source's model type, name, config hash and weights
fingerprint; the site, its layer and depth fraction, and the hidden size; the domain, the reduction, and
the number and hash of the prompts. The checker refuses a blade of another hidden size, and warns when
it is added at another depth than it was taken at, stacked with a blade of another domain, or added to
the very model it was taken from.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .analyze import capture
from .plan.archs import ModelInfo, config_hash, model_config
from .plan.files import FileProblem, load_tensor
from .vectors import one_site, states

Reduce = Literal["mean", "last", "sequence"]
KEY = "blade"  # the tensor's name in a blade file


@dataclass(frozen=True)
class BladeFile:
    """A recorded blade: a [hidden] vector (or a [length, hidden] sequence) and what its file records of
    how it was made."""

    tensor: torch.Tensor
    metadata: dict[str, str]

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the blade as safetensors (tensor "blade", with the metadata); returns the path."""
        save_file({KEY: self.tensor.detach().float().contiguous().cpu()}, os.fspath(path), metadata=self.metadata)
        return os.fspath(path)


def source_name(model: nn.Module) -> str:
    """The hub id or folder the model was loaded from, when it records one."""
    return str(getattr(model, "name_or_path", "") or getattr(model_config(model), "_name_or_path", "") or "")


@torch.no_grad()
def extract(model: nn.Module, tokenizer: Any, prompts: Sequence[str], site: str = "N-4", reduce: Reduce = "mean",
            domain: str | None = None, path: str | os.PathLike[str] | None = None, source: str | None = None,
            batch_size: int = 8, project: Literal["topk"] | None = None, width: int | None = None,
            calibration: Sequence[str] | None = None) -> BladeFile:
    """The source model's hidden state at `site`, averaged over the prompts: each prompt's mean over its
    real tokens (`reduce="mean"`), its last real token (`"last"`), or every token (`"sequence"`: a
    [length, hidden] blade whose row p is the mean over the prompts that reach position p). Written to
    `path` when given. `source` is the name recorded for the model (default: the hub id or folder it was
    loaded from).

    `project="topk"` keeps the `width` units (default: the source's hidden size) of largest mean |value|
    over every real token of the `calibration` prompts (default: `prompts`): the FFN projection of blade
    rule 7, for a site wider than the target, such as `h.K.mlp.hidden`. The file records their indices."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("give a non-empty list of prompts")
    where, info = one_site(model, site), ModelInfo.from_model(model)
    blocks = info.stacks.get(where.stack, info).num_layers  # an encoder–decoder model's: the stack's own
    if reduce == "sequence":
        tensor = _sequence(model, tokenizer, list(prompts), where.label)
    else:
        tensor = states(model, tokenizer, list(prompts), where.label, reduce, batch_size).mean(0)
    chosen: dict[str, str] = {}
    if project == "topk":
        keep = width or info.hidden_size
        if not 0 < keep <= tensor.shape[-1]:
            raise ValueError(f"project topk keeps {keep} of {where.label}'s {tensor.shape[-1]} units: choose a "
                             f"width in 1..{tensor.shape[-1]}")
        indices = _most_active(model, tokenizer, list(calibration or prompts), where.label, keep)
        chosen = {"project": "topk", "source_width": str(tensor.shape[-1]), "indices": json.dumps(indices.tolist()),
                  "calibration_prompts": str(len(calibration or prompts))}
        tensor = tensor[..., indices]
    elif project is not None:
        raise ValueError(f"project is 'topk' or None, not {project!r} (`project linear` is learned in the spec)")
    text = "\n".join(prompts)
    metadata = {
        "kind": "blade", "model_type": info.model_type, "source": source or source_name(model),
        "config_hash": config_hash(model)[:16], "weights": info.fingerprint, "hidden_size": str(tensor.shape[-1]),
        "site": where.label, "site_kind": where.kind, "layer": "" if where.layer is None else str(where.layer),
        "num_layers": str(blocks),
        "depth": "" if where.layer is None else f"{where.layer / blocks:.4f}",
        "domain": domain or "", "reduce": reduce, "prompts": str(len(prompts)),
        "prompts_hash": hashlib.sha256(text.encode()).hexdigest()[:16], "garage_version": __version__, **chosen,
    }
    blade = BladeFile(tensor, metadata)
    if path is not None:
        blade.save(path)
    return blade


def _most_active(model: nn.Module, tokenizer: Any, prompts: list[str], label: str, keep: int) -> torch.Tensor:
    """The `keep` units of largest mean |value| over every real token of the prompts, in ascending order."""
    device = next(model.parameters()).device
    total, tokens = None, 0
    for prompt in prompts:  # one at a time: every token is real
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"].to(device)
        h = capture(model, label, {"input_ids": ids})[label].float().reshape(ids.shape[1], -1).abs().sum(0).cpu()
        total = h if total is None else total + h
        tokens += ids.shape[1]
    assert total is not None
    return (total / tokens).topk(keep).indices.sort().values


def _sequence(model: nn.Module, tokenizer: Any, prompts: list[str], label: str) -> torch.Tensor:
    """[longest prompt, hidden]: row p is the mean state at position p over the prompts that reach it."""
    device = next(model.parameters()).device
    per_prompt = []
    for prompt in prompts:  # one at a time: no padding to align
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"].to(device)
        per_prompt.append(capture(model, label, {"input_ids": ids})[label].float().reshape(ids.shape[1], -1).cpu())
    total = torch.zeros(max(len(h) for h in per_prompt), per_prompt[0].shape[-1])
    count = torch.zeros(len(total), 1)
    for h in per_prompt:
        total[: len(h)] += h
        count[: len(h)] += 1
    return total / count


def info(path: str | os.PathLike[str]) -> dict[str, str]:
    """What a blade (or any one-tensor) file records, with its tensor's shape and norm. The file is read as
    a spec's values are (`plan.files.load_tensor`: bounded, no code run); a problem is a ValueError."""
    try:
        loaded = load_tensor(os.fspath(path))
    except FileProblem as err:
        raise ValueError(err.message + (f" ({err.hint})" if err.hint else "")) from None
    return {**loaded.metadata, "shape": json.dumps(list(loaded.tensor.shape)),
            "norm": f"{loaded.tensor.float().norm().item():.6g}"}
