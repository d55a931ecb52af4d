from __future__ import annotations

import torch
from torch import nn

from .base import Op


class Add(Op):
    """h ← h + F·v, with v a [hidden] vector: a buffer, or a trainable parameter (`add learn`)."""

    vector: torch.Tensor
    factor: torch.Tensor

    def __init__(self, vector: torch.Tensor, metadata: dict[str, str] | None = None, factor: float = 1.0,
                 learn: bool = False) -> None:
        super().__init__()
        self.metadata = dict(metadata or {})  # what the vector's file records, e.g. the layer it was made at
        start = vector.detach().clone().reshape(-1)
        if learn:
            self.vector = nn.Parameter(start)
        else:
            self.register_buffer("vector", start)
        self.scalar("factor", factor)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.factor * self.vector
