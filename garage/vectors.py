"""Steering vectors made from prompts: contrastive activation addition (ActAdd, Turner et al. 2023; CAA,
Rimsky et al. 2024).

`contrast` runs the model on positive and negative prompts and turns their hidden states at one site into
a vector (`from_states`): by default the difference of their means; `pca_diff` and `pca_center` are
repeng's PCA directions, `probe` a logistic regression's weight. `save` writes it as safetensors with
metadata that the checker reads: a vector made on another model type, or at another layer than the one a
spec adds it at, is warned about; one of another hidden size is an error.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .analyze import capture
from .fx.export import is_encoder_decoder
from .fx.seq2seq import decoder_start
from .plan.archs import ModelInfo
from .plan.prepare import sites_named
from .plan.resolve import ConcreteSite

Reduce = Literal["mean", "last"]
Method = Literal["mean", "pca_diff", "pca_center", "probe"]
METHODS: tuple[Method, ...] = ("mean", "pca_diff", "pca_center", "probe")
PAIRED: tuple[Method, ...] = ("pca_diff", "pca_center")  # positive i and negative i are a pair
# λ in the probe's loss, mean log-loss + λ/2 ‖w‖² on states divided by their RMS: sklearn's default
# strength (C = 1) for 100 prompts. Smaller lets a probe on a few prompts in many dimensions fit their
# noise; larger pulls its direction towards the mean difference (which it is as λ → ∞).
PROBE_PENALTY = 1e-2
Prompts = Sequence[str] | Sequence[tuple[str, str]]
KEY = "vector"  # the tensor's name in a saved file


def one_site(model: nn.Module, site: str) -> ConcreteSite:
    """The one concrete site that `site` names on this model (a ValueError when it names several)."""
    sites = sites_named(ModelInfo.from_model(model), site)
    if len(sites) != 1:
        raise ValueError(f"{site!r} names {len(sites)} sites; a steering vector is made at one")
    return sites[0]


@torch.no_grad()
def token_states(model: nn.Module, tokenizer: Any, prompts: Sequence[str], sites: Sequence[str], batch_size: int = 8
                 ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """The prompts in padded batches: every site's mask of real tokens [batch, seq] and its states
    [batch, seq, width] (float, on the CPU; OPT's flat MLP site made [batch, seq, width]).

    An encoder–decoder model reads each prompt as its source, and its decoder its start token, as when
    generation begins: an encoder site's states are the source's tokens, a decoder site's the first target
    position's (the state that steering at the decoder acts on first)."""
    device = next(model.parameters()).device
    info = ModelInfo.from_model(model)  # once: each site's stack, without walking the model again per site
    stacks = {site: sites_named(info, site)[0].stack for site in sites}
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        source = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).cpu()
        target = torch.ones(source.shape[0], 1, dtype=source.dtype)
        if is_encoder_decoder(model):
            inputs["decoder_input_ids"] = target.to(device) * decoder_start(model)
        captured = capture(model, list(sites), inputs)
        masks = {site: target if stacks[site] == "decoder" else source for site in sites}
        yield masks, {site: captured[site].float().cpu().reshape(*masks[site].shape, -1) for site in sites}


def states(model: nn.Module, tokenizer: Any, prompts: Sequence[str], site: str = "h.10",
           reduce: Reduce = "mean", batch_size: int = 8) -> torch.Tensor:
    """[len(prompts), hidden]: each prompt's hidden state at the site, the mean over its real tokens or
    its last real token. Padding never counts."""
    if reduce not in ("mean", "last"):
        raise ValueError(f"reduce must be 'mean' or 'last', not {reduce!r}")
    label = one_site(model, site).label
    rows = []
    for masks, found in token_states(model, tokenizer, prompts, [label], batch_size):
        h, mask = found[label], masks[label]
        if reduce == "mean":
            weights = mask.to(h.dtype)[..., None]
            rows.append((h * weights).sum(1) / weights.sum(1).clamp_min(1))
        else:
            last = mask.shape[1] - 1 - mask.flip(-1).to(torch.long).argmax(-1)  # the last real token
            rows.append(h[torch.arange(h.shape[0]), last])
    return torch.cat(rows)


def contrast(model: nn.Module, tokenizer: Any, positive: Prompts, negative: Sequence[str] | None = None,
             site: str = "h.10", reduce: Reduce = "mean", batch_size: int = 8,
             method: Method = "mean") -> torch.Tensor:
    """A [hidden] steering vector from the prompts' states at `site`, made by `method` (see `from_states`).

    `positive` and `negative` are lists of prompts, or `positive` is a list of (positive, negative) pairs
    and `negative` is left out. The PCA methods pair positive i with negative i."""
    if negative is None:
        pairs = [tuple(p) for p in positive]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError("without `negative`, `positive` must be a non-empty list of (positive, negative) pairs")
        pos, neg = [str(p[0]) for p in pairs], [str(p[1]) for p in pairs]
    else:
        pos, neg = [str(p) for p in positive], [str(n) for n in negative]
    check_method(method, len(pos), len(neg))  # before the model runs
    return from_states(states(model, tokenizer, pos, site, reduce, batch_size),
                       states(model, tokenizer, neg, site, reduce, batch_size), method)


def check_method(method: str, positives: int, negatives: int) -> None:
    """A ValueError unless `method` is known and the numbers of prompts suit it."""
    known_method(method)
    if not positives or not negatives:
        raise ValueError("give at least one positive and one negative prompt")
    if method in PAIRED and positives != negatives:
        raise ValueError(f"{method} pairs positive i with negative i: give as many negative prompts as positive "
                         f"ones, not {positives} and {negatives}")
    if method == "pca_diff" and positives < 2:
        raise ValueError("pca_diff needs at least 2 pairs: it centres their differences, and one is all zeros")


def known_method(method: str) -> None:
    """A ValueError, naming the choices, unless `method` is one of `METHODS`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")


def from_states(positive: torch.Tensor, negative: torch.Tensor, method: Method = "mean") -> torch.Tensor:
    """A [hidden] steering vector from [n+, hidden] positive and [n-, hidden] negative states.

    - `mean`: μ₊ − μ₋, the mean positive state minus the mean negative one (ActAdd, CAA).
    - `pca_diff` (repeng): the first principal component of the pairs' differences pos_i − neg_i, centred
      as sklearn's PCA centres them. Centring removes the mean difference, so this is the axis along which
      the differences vary most: the concept's when pairs differ in it by varying amounts, but noise when
      every pair differs by much the same vector.
    - `pca_center` (repeng): each pair's states less the pair's mean, stacked; their first principal
      component. What pairs share (topic, length) cancels, and the axis that splits pairs is left.
    - `probe`: the weight of a logistic regression telling positives (1) from negatives (0): an intercept,
      and the L2 penalty `PROBE_PENALTY` on the weight only (without it, separable states, which few
      prompts in many dimensions always are, have no finite optimum). The states are divided by one
      number, their RMS about their mean, so the penalty's strength does not depend on the model's
      scale; the direction is unchanged by that. Fitted exactly by Newton's method, in float64.

    Every method but `mean` finds a unit direction û and returns û (û·(μ₊ − μ₋)), the mean difference's
    component along it: a vector the positives project higher on than the negatives whichever sign the
    SVD gave û (PCA's sign is arbitrary), and that `add v * 1` moves a state as far along û as the mean
    difference does, so the multipliers that suit a `mean` vector suit these too (repeng returns û)."""
    check_method(method, len(positive), len(negative))
    if method == "mean":
        return positive.mean(0) - negative.mean(0)
    pos, neg = positive.double(), negative.double()
    if method == "pca_diff":
        diffs = pos - neg
        unit = first_component(diffs - diffs.mean(0))
    elif method == "pca_center":
        centre = (pos + neg) / 2
        unit = first_component(torch.cat([pos - centre, neg - centre]))
    else:
        weight = probe(pos, neg)
        unit = weight / weight.norm().clamp_min(torch.finfo(weight.dtype).tiny)
    return (unit * (unit @ (pos.mean(0) - neg.mean(0)))).to(positive.dtype)


def first_component(rows: torch.Tensor) -> torch.Tensor:
    """The unit vector that `rows` (already centred) vary most along: their first right singular vector.
    An exact SVD: the matrix is [prompts, hidden], small enough, and `pca_lowrank` would be approximate."""
    return torch.linalg.svd(rows, full_matrices=False).Vh[0]


def probe(positive: torch.Tensor, negative: torch.Tensor, penalty: float = PROBE_PENALTY,
          steps: int = 100) -> torch.Tensor:
    """The weight w of the logistic regression that minimises mean log-loss + penalty/2 ‖w‖² (intercept b
    free) on the states divided by their RMS about their mean (float64 in, float64 out).

    At the optimum w = −Σ (p_i − y_i) x_i / (n·penalty), and Σ (p_i − y_i) = 0 (b's gradient), so w lies in
    the span of the centred states: Newton's method runs in an orthonormal basis of it (a QR), r ≤ min(n,
    hidden) coordinates, which gives the same w at O(r³) a step instead of O(hidden³). A backtracking line
    search keeps every step downhill."""
    inputs = torch.cat([positive, negative])
    labels = torch.cat([positive.new_ones(len(positive)), negative.new_zeros(len(negative))])
    centred = inputs - inputs.mean(0)
    scale = centred.pow(2).mean().sqrt().clamp_min(torch.finfo(inputs.dtype).tiny)
    basis, coords = torch.linalg.qr(centred.T / scale)  # centred / scale = coords.T @ basis.T
    design = torch.cat([coords.T, torch.ones_like(labels)[:, None]], 1)  # coordinates in the span, then 1 for b
    ridge = torch.full((design.shape[1],), penalty, dtype=inputs.dtype)
    ridge[-1] = 0.0  # the intercept is not penalised

    def loss(theta: torch.Tensor) -> torch.Tensor:
        logits = design @ theta
        return (F.softplus(logits) - labels * logits).mean() + 0.5 * (ridge * theta * theta).sum()

    theta = torch.zeros_like(ridge)
    for _ in range(steps):
        p = torch.sigmoid(design @ theta)
        grad = design.T @ (p - labels) / len(labels) + ridge * theta
        hess = (design.T * (p * (1 - p))) @ design / len(labels) + torch.diag(ridge)
        step = torch.linalg.solve(hess, grad)
        decrement = grad @ step  # twice Newton's estimate of how far the loss is above its minimum
        if decrement <= 1e-20:
            break
        size, before = 1.0, loss(theta)
        while loss(theta - size * step) > before - 0.25 * size * decrement and size > 1e-10:
            size /= 2
        theta = theta - size * step
    return basis @ theta[:-1] / scale


def metadata(model: nn.Module, site: str, prompts: int, reduce: Reduce, method: Method = "mean") -> dict[str, str]:
    """What a saved vector records of how it was made: what the checker compares with its use."""
    known_method(method)
    info, where = ModelInfo.from_model(model), one_site(model, site)
    return {"model_type": info.model_type, "hidden_size": str(info.hidden_size), "site": where.label,
            "layer": "" if where.layer is None else str(where.layer), "num_layers": str(info.num_layers),
            "prompts": str(prompts), "reduce": reduce, "method": method}


def save(path: str | os.PathLike[str], vector: torch.Tensor, **meta: object) -> str:
    """Write `vector` as safetensors (tensor "vector") with `meta` as its metadata, plus its hidden size,
    its kind and the garage version; returns the path."""
    if vector.dim() != 1:
        raise ValueError(f"a steering vector is one [hidden] vector, not shape {list(vector.shape)}")
    recorded = {"kind": "steering-vector", "hidden_size": str(vector.shape[0]), "garage_version": __version__}
    recorded.update({key: str(value) for key, value in meta.items() if value is not None})
    save_file({KEY: vector.detach().float().contiguous().cpu()}, os.fspath(path), metadata=recorded)
    return os.fspath(path)
