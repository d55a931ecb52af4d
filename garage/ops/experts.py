from __future__ import annotations

import torch

from .base import Op


class MaskExperts(Op):
    """logits[..., e] ← the dtype's lowest value for each masked expert e: no top-k picks it while any other
    expert is left, and softmax (or sigmoid) gives it weight 0. `force K` masks every expert but K."""

    masked: torch.Tensor

    def __init__(self, experts: int, masked: tuple[int, ...]) -> None:
        super().__init__()
        keep = torch.zeros(experts, dtype=torch.bool)
        keep[list(masked)] = True
        self.register_buffer("masked", keep)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(self.masked, torch.finfo(logits.dtype).min)

    def extra_repr(self) -> str:
        return f"masked={self.masked.nonzero().flatten().tolist()}"
