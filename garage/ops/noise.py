from __future__ import annotations

import torch

from .base import Op


class Noise(Op):
    """h ← h + STD·ε, ε ~ N(0, 1), drawn from torch's generator: in training mode only, unless `always`.

    It is also the built-in `module noise(std=…)`, the seed library's ActivationNoise."""

    std: torch.Tensor

    def __init__(self, std: float = 0.01, always: bool = False) -> None:
        super().__init__()
        self.scalar("std", std)
        self.always = always

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.always):
            return h
        return h + self.std * torch.randn_like(h)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", always" if self.always else "")
