"""`blade METHOD from SOURCE [project KIND] [alpha F]`: h ← h + α · g(h) ⊙ b.

b is the source's hidden state, brought to the model's hidden size by `project`. g is 1 for
`identity`, and a learned per-dimension sigmoid gate for `gated`. The defaults follow the Blades research:
α = 0.1 (it used 0.1–0.3), and the gate starts nearly closed, at σ(−2) ≈ 0.12 (zero weights, bias −2), so
that an untrained gated blade changes the model little until training opens it. The gate's parameters
are trainable and follow the model's dtype and device.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Op
from .positions import token_positions

DEFAULT_ALPHA = 0.1
GATE_BIAS = -2.0  # the gate's starting logit: σ(−2) ≈ 0.119


class TensorSource(nn.Module):
    """A recorded blade, projected if it is wider: a [hidden] vector added at every position, or a sequence
    blade [length, hidden] whose row p is added at absolute position p (counted from the first real token,
    as `[i]` positions are), and nothing past its end or at padding; cached generation follows the same
    rule."""

    blade: torch.Tensor

    def __init__(self, blade: torch.Tensor, hidden: int, project: str | None, metadata: dict[str, str] | None = None) -> None:
        super().__init__()
        self.metadata = dict(metadata or {})  # what the blade file records, e.g. {"domain": "math"}
        blade = blade.detach().clone()
        self.sequence = blade.dim() == 2
        width = blade.shape[-1]
        self.linear: nn.Linear | None = None
        if project == "topk" and width > hidden:
            keep = blade.abs().reshape(-1, width).mean(0).topk(hidden).indices.sort().values
            blade = blade[..., keep]
        elif project == "linear" and width != hidden:
            self.linear = nn.Linear(width, hidden, bias=False)
        self.register_buffer("blade", blade)

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None, real: torch.Tensor | None = None,
                ) -> torch.Tensor:
        blade = self.blade if self.linear is None else self.linear(self.blade)
        if positions is None:
            return blade
        length = blade.shape[0]
        rows = blade.index_select(0, positions.clamp(0, length - 1).reshape(-1)).reshape(*positions.shape, -1)
        keep = (positions < length) if real is None else (positions < length) & real  # padding gets nothing
        return (rows * keep.unsqueeze(-1).to(rows.dtype)).reshape(h.shape)


class LiveSource(nn.Module):
    """A source model run on the same input: its hidden state at `site` (of the source), which the injected
    graph computes by running the source's layers up to that site (`fx.fuse`) and passes in, projected by a
    trainable Linear (`project linear`) when the widths differ. The source model is held, not owned: its
    parameters are not the op's, and moving the op never moves them."""

    def __init__(self, model: nn.Module, site: object, width: int, hidden: int, project: str | None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)
        self.model: nn.Module
        self.site = site  # a plan.resolve.ConcreteSite of the source model
        self.width = width
        self.metadata = dict(metadata or {})  # the same provenance keys a blade file records
        self.linear = nn.Linear(width, hidden, bias=False) if project == "linear" and width != hidden else None

    def forward(self, state: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        state = state.reshape(*h.shape[:-1], self.width)  # the same tokens, whatever layout the source keeps
        return state if self.linear is None else self.linear(state)


class ModuleSource(nn.Module):
    """A bound module computing the blade from the hidden state: b = module(h)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)


class Blade(Op):
    alpha: torch.Tensor
    gate: nn.Linear

    def __init__(self, source: nn.Module, hidden: int, method: str, alpha: float | None = None) -> None:
        super().__init__()
        self.source = source
        self.method = method
        self.scalar("alpha", DEFAULT_ALPHA if alpha is None else alpha)
        if method == "gated":
            self.gate = nn.Linear(hidden, hidden)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, GATE_BIAS)

    @property
    def takes_positions(self) -> bool:
        """A sequence blade reads each token's absolute position."""
        return isinstance(self.source, TensorSource) and self.source.sequence

    @property
    def live(self) -> LiveSource | None:
        """The live source model, whose state the graph passes in after h."""
        return self.source if isinstance(self.source, LiveSource) else None

    def forward(self, h: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
        """`inputs` are the source's state for a live blade, the position inputs for a sequence blade
        (attention mask, prompt lengths, position ids, input ids), else nothing."""
        if self.live is not None:
            b = self.source(inputs[0], h)
        elif self.takes_positions:
            mask, prompt_length, position_ids, input_ids = inputs
            b = self.source(h, *token_positions(h, mask, position_ids, input_ids, prompt_length))
        else:
            b = self.source(h)
        if self.method == "gated":
            b = torch.sigmoid(self.gate(h)) * b
        return h + self.alpha * b

    def extra_repr(self) -> str:
        return f"method={self.method!r}, alpha={self.alpha.item():g}"
