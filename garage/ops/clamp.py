from __future__ import annotations

import torch

from .base import Op


class Clamp(Op):
    """h ← clamp(h, LO, HI)"""

    low: torch.Tensor
    high: torch.Tensor

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.scalar("low", low)
        self.scalar("high", high)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.clamp(h, self.low.to(h.dtype), self.high.to(h.dtype))
