"""`… when SITE @ VALUE > F [soft T]`: an op that acts on a row only where a condition holds (CAST).

The condition is per row (sequence): c = the mean, over the row's real tokens, of cos(s_t, v), where s is
the condition site's state and v the condition vector. The gate is g = [c > F] (or [c < F]), or, with
`soft T`, g = σ((c − F)/T) (σ((F − c)/T) for `<`), which is differentiable. The op's result is mixed in as
torch.lerp(h, op(h), g), which is exactly op(h) at g = 1 and exactly h at g = 0.

In generation, the prompt decides: the step that runs a row's prompt tokens computes its gate and keeps
it in a buffer, and the steps that run its new tokens read it back. The buffer has room for `MAX_ROWS`
rows and keeps its address, so a compiled step graph reads it live.
"""

from __future__ import annotations

import torch
from torch import nn

from .wrapper import Wrapper, takes_positions

MAX_ROWS = 4096  # rows a generation batch may have when a spec has conditions


class Conditional(Wrapper):
    """`inner`, applied to the rows whose condition holds (see the module docstring)."""

    takes_positions = True
    unit: torch.Tensor
    threshold: torch.Tensor
    kept: torch.Tensor

    def __init__(self, inner: nn.Module, vector: torch.Tensor, site: object, compare: str, threshold: float,
                 soft: float | None = None) -> None:
        super().__init__()
        self.inner, self.site, self.compare, self.soft = inner, site, compare, soft  # site: the condition's ConcreteSite
        self.register_buffer("unit", vector / vector.norm())
        self.register_buffer("threshold", torch.tensor(float(threshold)))  # a buffer: calibrate without recompiling
        self.register_buffer("kept", torch.zeros(MAX_ROWS), persistent=False)

    def gate(self, state: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """[batch] g of each row, from the condition site's state and which of its tokens are real."""
        state = state.reshape(*real.shape, -1).float()
        cos = (state @ self.unit.float()) / state.norm(dim=-1).clamp_min(1e-12)
        weights = real.to(cos.dtype)
        value = (cos * weights).sum(-1) / weights.sum(-1).clamp_min(1)
        margin = value - self.threshold if self.compare == ">" else self.threshold - value
        return torch.sigmoid(margin / self.soft) if self.soft is not None else (margin > 0).to(cos.dtype)

    def forward(self, h: torch.Tensor, state: torch.Tensor, mask: torch.Tensor | None,
                position_mask: torch.Tensor | None = None, prompt_length: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`state` is the condition site's value in this call, `mask` the graph's attention mask (in the step
        graph it spans the cache, whose first columns are the prompt's); the rest are the position inputs."""
        rows = (input_ids if input_ids is not None else h).shape[0]
        seq = state.shape[1] if state.dim() == 3 else state.shape[0] // rows
        real = torch.ones(rows, seq, dtype=torch.bool, device=h.device) if mask is None else mask[:, :seq].bool()
        g = self.gate(state, real)
        if prompt_length is not None and position_ids is not None:  # generation: the prompt's gate holds
            runs_prompt = (position_ids.expand(rows, seq) < prompt_length.reshape(-1, 1)).any(-1)
            g = torch.where(runs_prompt, g, self.kept[:rows])
            self.kept[:rows].copy_(g)
        inner = self.inner(h, position_mask, prompt_length, position_ids, input_ids) if takes_positions(self.inner) \
            else self.inner(h)
        if h.dim() == 3:
            weight = g.reshape(rows, 1, 1)
        else:  # a flattened value ([batch*seq, width]: routers, OPT's MLP)
            weight = g.reshape(rows, 1).expand(rows, h.shape[0] // rows).reshape(-1, 1)
        return torch.lerp(h, inner, weight.to(h.dtype))

    def extra_repr(self) -> str:
        soft = f", soft={self.soft:g}" if self.soft is not None else ""
        return f"when {self.compare} {self.threshold.item():g}{soft}"
