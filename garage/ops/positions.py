from __future__ import annotations

import torch
from torch import nn

from .capture import Capture


class AtPositions(nn.Module):
    """Applies `inner` at some sequence positions only; the others pass through unchanged.

    Positions are absolute: counted from the first real (unpadded) token of the prompt, which is what
    `cumsum(attention_mask) - 1` gives, also for left-padded batches. `[last]` is the last position of
    each forward call. `prompt_length` (per row) separates `[prompt]` from `[new]` during generation;
    without it every position is a prompt position. A capture at positions records the full-shape
    tensor with the other positions zeroed.
    """

    def __init__(self, inner: nn.Module, kind: str, start: int | None = None, stop: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.kind, self.start, self.stop = kind, start, stop

    def selected(self, h: torch.Tensor, attention_mask: torch.Tensor | None, prompt_length: torch.Tensor | None) -> torch.Tensor:
        """A [batch, seq] bool mask of the positions this op touches."""
        if attention_mask is None:
            batch = 1 if h.dim() == 2 else h.shape[0]
            seq = h.shape[0] if h.dim() == 2 else h.shape[1]
            pos = torch.arange(seq, device=h.device).expand(batch, seq)
            real = torch.ones_like(pos, dtype=torch.bool)
        else:
            mask = attention_mask.to(torch.long)
            pos = (mask.cumsum(-1) - 1)[:, -(h.shape[1] if h.dim() == 3 else h.shape[0] // mask.shape[0]):]
            real = mask[:, -pos.shape[1]:].bool()
        if self.kind == "last":
            sel = torch.zeros_like(real)
            sel[:, -1] = True
            return sel
        if self.kind in ("prompt", "new"):
            if prompt_length is None:
                in_prompt = real
            else:
                in_prompt = pos < prompt_length.reshape(-1, 1)
            return (in_prompt if self.kind == "prompt" else ~in_prompt) & real
        start = self.start if self.start is not None else 0
        stop = start + 1 if self.kind == "index" else self.stop
        sel = real & (pos >= start)
        return sel if stop is None else sel & (pos < stop)

    def forward(
        self, h: torch.Tensor, attention_mask: torch.Tensor | None = None, prompt_length: torch.Tensor | None = None
    ) -> torch.Tensor:
        sel = self.selected(h, attention_mask, prompt_length).reshape(*h.shape[:-1], 1)
        if isinstance(self.inner, Capture):  # keeps the selected positions, zeros elsewhere, full shape
            self.inner(torch.where(sel, h, torch.zeros_like(h)))
            return h
        return torch.where(sel, self.inner(h), h)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, start={self.start}, stop={self.stop}"
