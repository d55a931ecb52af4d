from __future__ import annotations

import torch

from .base import Op


class Ablate(Op):
    """h ← h − (h·v̂) v̂: removes the direction v (v̂ = v/‖v‖) from every position."""

    unit: torch.Tensor

    def __init__(self, direction: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
        super().__init__()
        self.metadata = dict(metadata or {})  # what the direction's file records
        v = direction.detach().reshape(-1).to(torch.float64)
        norm = v.norm()
        if norm == 0:
            raise ValueError("cannot ablate a zero vector")
        self.register_buffer("unit", (v / norm).to(direction.dtype if direction.is_floating_point() else torch.float32))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h - (h @ self.unit).unsqueeze(-1) * self.unit
