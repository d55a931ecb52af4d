"""`debate METHOD [views KIND] [strength F]`, and the bare `blade METHOD` self-debate chamber.

Two views of h are made and reconciled. Views: `dropout` (independent dropout masks, training mode
only), `noise` (h + F·ε, always: a random view the user asked for), `projection` (a fixed, trainable
near-identity linear map: deterministic). Reconciliation: `average`, `confidence` (each view weighted
per token by how peaked its softmax over the hidden dimension is) or `gated` (a learned sigmoid gate,
starting at one half).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Op

DEFAULT_VIEWS = "projection"
DEFAULT_STRENGTH = 0.1


class Debate(Op):
    strength: torch.Tensor
    projection: nn.Linear
    gate: nn.Linear

    def __init__(self, hidden: int, method: str, views: str | None = None, strength: float | None = None) -> None:
        super().__init__()
        self.method = method
        self.views = views or DEFAULT_VIEWS
        self.scalar("strength", DEFAULT_STRENGTH if strength is None else strength)
        if self.views == "projection":
            self.projection = nn.Linear(hidden, hidden, bias=False)
            with torch.no_grad():
                jitter = torch.randn(hidden, hidden) / hidden**0.5
                self.projection.weight.copy_(torch.eye(hidden) + self.strength * jitter)
        if method == "gated":
            self.gate = nn.Linear(2 * hidden, hidden)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def _views(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.views == "dropout":
            return self._dropped(h), self._dropped(h)
        if self.views == "noise":
            return h, h + self.strength * torch.randn_like(h)
        return h, self.projection(h)

    def _dropped(self, h: torch.Tensor) -> torch.Tensor:
        """Inverted dropout of rate `strength`, in training mode only. Written out (not F.dropout, which
        takes a Python float) so the rate stays a tensor: a new rate never recompiles, and export works."""
        if not self.training:
            return h
        keep = 1 - self.strength
        return h * (torch.rand_like(h) < keep).to(h.dtype) / keep

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.reconcile(*self._views(h))

    def reconcile(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The two views made one, by the chamber's method."""
        if self.method == "average":
            return (a + b) / 2
        if self.method == "confidence":
            conf = torch.stack([a.softmax(-1).amax(-1), b.softmax(-1).amax(-1)], dim=-1)
            w = conf.softmax(-1).to(a.dtype)
            return w[..., :1] * a + w[..., 1:] * b
        g = torch.sigmoid(self.gate(torch.cat([a, b], dim=-1)))
        return g * a + (1 - g) * b

    def extra_repr(self) -> str:
        return f"method={self.method!r}, views={self.views!r}, strength={self.strength.item():g}"


CHAMBER_METHOD = {"gated": "gated", "identity": "average", None: "gated"}


def chamber(hidden: int, blade_method: str | None) -> Debate:
    """The self-debate chamber that a bare `blade METHOD` names."""
    return Debate(hidden, CHAMBER_METHOD[blade_method])
