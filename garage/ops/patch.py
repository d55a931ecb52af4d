"""`patch from source [mix F]`: h ← h + w·(s − h), s the same site's value on a second (source) input.

Base and source are two batches of token rows, paired row by row (or one source row for every base row).
Tokens are matched by position, counted from each row's first real token: the base token at position p
takes the source token at position p, where the source has one; `[last]` pairs each row's last real token
with the source row's last real token, whatever their lengths. w is the statement's mix F (1 by default)
times a per-token weight the graph passes in (1 for a plain call; a sweep sets it per cell, and its
gradient is attribution patching's estimate). torch.lerp is exact at w = 0 and w = 1.
"""

from __future__ import annotations

import torch

from .base import Op


def first_real(mask: torch.Tensor) -> torch.Tensor:
    """The column of each row's first real token (leading padding counted), for left or right padding."""
    return (mask.to(torch.long).cumsum(-1) == 0).sum(-1)


class Patch(Op):
    """The site's value taken from the source run at the chosen tokens (and heads); see the module docstring."""

    mix: torch.Tensor
    units: torch.Tensor

    def __init__(self, mix: float = 1.0, kind: str | None = None, start: int | None = None, stop: int | None = None,
                 heads: int = 0, chosen: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.kind, self.start, self.stop = kind, start, stop
        self.scalar("mix", mix)
        units = torch.ones(max(heads, 1))
        if heads and chosen is not None:
            units.zero_()[list(chosen)] = 1.0
        self.register_buffer("units", units, persistent=False)  # 1 for each patched head (one unit: the site)

    def selected(self, mask: torch.Tensor, source_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, seq] whether each base token is patched, and the source column it reads."""
        seq = mask.shape[-1]
        base_first, base_len = first_real(mask), mask.to(torch.long).sum(-1, keepdim=True)
        source_first, source_len = first_real(source_mask)[:, None], source_mask.to(torch.long).sum(-1, keepdim=True)
        pos = torch.arange(seq, device=mask.device) - base_first[:, None]
        real = mask.bool()
        if self.kind == "last":
            return real & (pos == base_len - 1), (source_first + source_len - 1).expand(-1, seq)
        sel = real & (pos < source_len)
        if self.kind in ("index", "slice"):
            start = self.start or 0
            stop = start + 1 if self.kind == "index" else self.stop
            sel = sel & (pos >= start)
            if stop is not None:
                sel = sel & (pos < stop)
        return sel, source_first + pos

    def forward(self, h: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, source_mask: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        """`weight` is [batch or 1, seq or 1, heads or 1]; `source` is the site's value on the source rows."""
        batch, seq = mask.shape
        units = self.units.shape[0]
        base = h.reshape(batch, seq, units, -1)  # flat sites ([batch*seq, width]) too
        src = source.reshape(source_mask.shape[0], source_mask.shape[1], units, -1).expand(batch, -1, -1, -1)
        sel, column = self.selected(mask, source_mask.expand(batch, -1))
        column = column.clamp(0, src.shape[1] - 1)
        taken = src.gather(1, column[:, :, None, None].expand(-1, -1, units, src.shape[-1]))
        w = sel[:, :, None].to(weight.dtype) * weight * self.units * self.mix
        return torch.lerp(base, taken, w[..., None].to(h.dtype)).reshape(h.shape)

    def extra_repr(self) -> str:
        where = f", positions={self.kind!r}" if self.kind else ""
        return f"mix={self.mix.item():g}{where}"
