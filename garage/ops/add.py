from __future__ import annotations

import torch

from .base import Op


class Add(Op):
    """h ← h + F·v, with v a [hidden] vector."""

    vector: torch.Tensor
    factor: torch.Tensor

    def __init__(self, vector: torch.Tensor, metadata: dict[str, str] | None = None, factor: float = 1.0) -> None:
        super().__init__()
        self.metadata = dict(metadata or {})  # what the vector's file records, e.g. the layer it was made at
        self.register_buffer("vector", vector.detach().clone().reshape(-1))
        self.scalar("factor", factor)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.factor * self.vector
