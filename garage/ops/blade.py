"""`blade METHOD from SOURCE [project KIND] [alpha F]`: h ← h + α · g(h) ⊙ b.

b is the source's hidden state, brought to the model's hidden size by `project`. g is 1 for
`identity`, and a learned per-dimension sigmoid gate for `gated`. The defaults follow the Blades research:
α = 0.1 (it used 0.1–0.3), and the gate starts nearly closed, at σ(−2) ≈ 0.12 (zero weights, bias −2), so
that an untrained gated blade changes the model little until training opens it. The gate's parameters
are trainable and follow the model's dtype and device.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Op

DEFAULT_ALPHA = 0.1
GATE_BIAS = -2.0  # the gate's starting logit: σ(−2) ≈ 0.119


class TensorSource(nn.Module):
    """A recorded blade: a [hidden] (or broadcastable [..., hidden]) tensor, projected if it is wider."""

    blade: torch.Tensor

    def __init__(self, blade: torch.Tensor, hidden: int, project: str | None, metadata: dict[str, str] | None = None) -> None:
        super().__init__()
        self.metadata = dict(metadata or {})  # what the blade file records, e.g. {"domain": "math"}
        blade = blade.detach().clone()
        width = blade.shape[-1]
        self.linear: nn.Linear | None = None
        if project == "topk" and width > hidden:
            keep = blade.abs().reshape(-1, width).mean(0).topk(hidden).indices.sort().values
            blade = blade[..., keep]
        elif project == "linear" and width != hidden:
            self.linear = nn.Linear(width, hidden, bias=False)
        self.register_buffer("blade", blade)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.blade if self.linear is None else self.linear(self.blade)


class ModuleSource(nn.Module):
    """A bound module computing the blade from the hidden state: b = module(h)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)


class Blade(Op):
    alpha: torch.Tensor
    gate: nn.Linear

    def __init__(self, source: nn.Module, hidden: int, method: str, alpha: float | None = None) -> None:
        super().__init__()
        self.source = source
        self.method = method
        self.scalar("alpha", DEFAULT_ALPHA if alpha is None else alpha)
        if method == "gated":
            self.gate = nn.Linear(hidden, hidden)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, GATE_BIAS)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b = self.source(h)
        if self.method == "gated":
            b = torch.sigmoid(self.gate(h)) * b
        return h + self.alpha * b

    def extra_repr(self) -> str:
        return f"method={self.method!r}, alpha={self.alpha.item():g}"
