from __future__ import annotations

import torch

from .base import Op


class Capture(Op):
    """h unchanged; a detached copy is kept in `store[key]` (the InjectedModel's `.captures`).

    Each call replaces it, so that the op does the same thing in every graph and never grows a value
    inside one. During generation `runtime.recording` takes each call's copy out, and joins them."""

    observes_only = True

    def __init__(self, store: dict[str, torch.Tensor], key: str) -> None:
        super().__init__()
        self.store = store
        self.key = key

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.store[self.key] = h.detach()
        return h

    def extra_repr(self) -> str:
        return f"key={self.key!r}"
