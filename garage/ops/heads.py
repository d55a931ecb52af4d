from __future__ import annotations

import torch
from torch import nn

from .wrapper import Wrapper


class Heads(Wrapper):
    """Applies `inner` per attention head: [..., heads × size] is split into [..., heads, size], `inner` sees the
    chosen heads ([..., k, size], in index order) and the other heads pass through unchanged.

    A vector for `inner` (add, ablate) is [size] and acts on each chosen head alike."""

    index: torch.Tensor

    def __init__(self, inner: nn.Module, count: int, chosen: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.inner, self.count = inner, count
        self.chosen = tuple(range(count)) if chosen is None else tuple(chosen)
        self.register_buffer("index", torch.tensor(self.chosen, dtype=torch.long), persistent=False)

    def select(self, h: torch.Tensor) -> torch.Tensor:
        """The chosen heads of h: [..., k, size]."""
        split = h.unflatten(-1, (self.count, -1))
        return split if len(self.chosen) == self.count else split.index_select(-2, self.index)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.inner(self.select(h))
        if self.observes_only:
            return h
        if len(self.chosen) == self.count:
            return out.flatten(-2)
        return h.unflatten(-1, (self.count, -1)).index_copy(-2, self.index, out.to(h.dtype)).flatten(-2)

    def extra_repr(self) -> str:
        return f"heads={list(self.chosen)} of {self.count}"
