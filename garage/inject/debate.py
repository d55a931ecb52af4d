"""`SelfDebate`, the seed's self-debate chamber: two views of a layer's hidden state, reconciled.

The seed's parameters are kept: `divergence_method` (`dropout`, `perturbation` (the language's `noise`)
or `projection`), `divergence_strength`, `reconciliation_method` (`average`, `confidence`, `gated`) and
`layer_name_template` (e.g. "transformer.h.{idx}", the seed's form, or "transformer.h.{}"; default: the block
list discovery finds).

Its views differ in eval mode too, unlike the seed's, whose dropout views did nothing under `model.eval()`
(the guide's own example changed no output): a chamber exists to compare two different views. The
randomness is drawn from SelfDebate's own generator, seeded with `seed` (default 0), so a run repeats
exactly and leaves torch's global generator alone. (The language's `debate views dropout` stays
training-only; this is the seed API's behaviour.)

Fixes over the seed: the chamber follows the model's dtype (gated debate works in fp16/bf16), and
`get_debate_info()` returns one record a call (the cosine similarity and L2 distance of the two views,
and how far the chamber moved the state) from a bounded window, kept as tensors until it is read, so a
forward pass never waits on the GPU.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import nn

from .. import ops
from ..lang.diagnostics import GarageError
from ..plan.archs import ModelInfo
from ..plan.prepare import sites_named
from ..plan.resolve import ConcreteSite
from ..runtime.hooks import HookSet, attach

HISTORY = 64  # per-call records kept for get_debate_info()
VIEWS = {"dropout": "dropout", "perturbation": "noise", "noise": "noise", "projection": "projection"}


class SeededChamber(ops.Debate):
    """The chamber with random views drawn from its own seeded generator, in eval mode as in training."""

    def __init__(self, hidden: int, method: str, views: str, strength: float, seed: int) -> None:
        super().__init__(hidden, method, views, strength)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def _random(self, h: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) values of h's shape from the chamber's generator (made on h's device)."""
        if self._generator is None or self._generator.device != h.device:
            self._generator = torch.Generator(device=h.device).manual_seed(self.seed)
        return torch.rand(h.shape, generator=self._generator, device=h.device, dtype=torch.float32)

    def _dropped(self, h: torch.Tensor) -> torch.Tensor:
        keep = 1 - self.strength
        return h * (self._random(h) < keep).to(h.dtype) / keep

    def _views(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.views == "noise":  # Gaussian by Box–Muller from the same generator
            u, v = self._random(h).clamp_min(1e-12), self._random(h)
            normal = (-2 * u.log()).sqrt() * torch.cos(2 * torch.pi * v)
            return h, h + self.strength * normal.to(h.dtype)
        return super()._views(h)


class _Recording(nn.Module):
    """Runs the chamber and keeps, as tensors (no sync), how its two views compare and how far it moved h."""

    def __init__(self, chamber: ops.Debate, history: deque) -> None:
        super().__init__()
        self.chamber = chamber
        self.history = history

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.chamber._views(h)
        out = self.chamber.reconcile(a, b)
        with torch.no_grad():
            a32, b32 = a.float(), b.float()
            self.history.append(torch.stack([
                nn.functional.cosine_similarity(a32, b32, dim=-1).mean(),
                (a32 - b32).norm(dim=-1).mean(),
                (out - h).float().norm() / h.float().norm().clamp_min(1e-12),
            ]).detach())
        return out


class SelfDebate:
    """Context manager: while enabled, block `layer_idx` (default N-4) runs a self-debate chamber."""

    def __init__(
        self,
        model: nn.Module,
        layer_idx: int | None = None,
        divergence_method: str = "dropout",
        reconciliation_method: str = "gated",
        divergence_strength: float = 0.1,
        layer_name_template: str | None = None,
        seed: int = 0,
    ) -> None:
        if divergence_method not in VIEWS:
            raise ValueError(f"divergence_method must be dropout, perturbation or projection, not {divergence_method!r}")
        if divergence_method == "dropout" and not 0 <= divergence_strength < 1:
            raise ValueError(f"a dropout divergence_strength is a probability in [0, 1), not {divergence_strength}")
        if reconciliation_method not in ("average", "confidence", "gated"):
            raise ValueError(f"reconciliation_method must be average, confidence or gated, not {reconciliation_method!r}")
        self.model = model
        self.info = ModelInfo.from_model(model)
        n = self.info.num_layers
        self.layer_idx = n - 4 if layer_idx is None else (layer_idx + n if layer_idx < 0 else layer_idx)
        if not 0 <= self.layer_idx < n:
            raise ValueError(f"layer_idx {layer_idx} is out of range: this model has {n} layers (0..{n - 1})")
        self.divergence_method = divergence_method
        self.reconciliation_method = reconciliation_method
        self.divergence_strength = divergence_strength
        self.chamber = SeededChamber(self.info.hidden_size, reconciliation_method, VIEWS[divergence_method],
                                     divergence_strength, seed)
        ops.place(self.chamber, model)
        self._history: deque = deque(maxlen=HISTORY)
        self._hooks: HookSet | None = None
        self.site = self._site(layer_name_template)

    def _site(self, template: str | None) -> ConcreteSite:
        if template is None:
            return ConcreteSite("out", self.layer_idx, self.info.block(self.layer_idx))
        try:  # the seed's own form is "transformer.h.{idx}" (formatted with idx=); "{}" works too
            path = template.format(self.layer_idx, idx=self.layer_idx)
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"layer_name_template {template!r} cannot be filled in ({type(err).__name__}: {err}); "
                             "write the block index as {idx} or {}, e.g. 'transformer.h.{idx}'") from None
        try:
            (site,) = sites_named(self.info, path)
        except GarageError as err:
            raise ValueError(f"layer_name_template {template!r} gives {path!r}: {err.diagnostics[0].message}") from None
        return site

    def enable(self) -> "SelfDebate":
        if self._hooks is None:
            self._hooks = attach(self.model, [self.site], [_Recording(self.chamber, self._history)])
        return self

    def disable(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    @property
    def enabled(self) -> bool:
        return self._hooks is not None

    def __enter__(self) -> "SelfDebate":
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    def get_debate_info(self) -> list[dict[str, float]]:
        """One record per recent call (at most HISTORY): the two views' mean cosine similarity and mean L2
        distance per token, and the chamber's relative change of the hidden state."""
        keys = ("cosine_similarity", "l2_difference", "relative_shift")
        return [dict(zip(keys, row.tolist())) for row in self._history]

    def settings(self) -> dict[str, Any]:
        """Where the chamber sits and how it is set up."""
        return {"layer_idx": self.layer_idx, "layer_path": self.site.module_path,
                "divergence_method": self.divergence_method, "reconciliation_method": self.reconciliation_method,
                "divergence_strength": self.divergence_strength, "enabled": self.enabled}
