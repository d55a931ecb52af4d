from __future__ import annotations

import torch

from .base import Op


class Scale(Op):
    """h ← F·h"""

    factor: torch.Tensor

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.scalar("factor", factor)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.factor
