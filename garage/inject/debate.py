"""`SelfDebate`, the seed's self-debate chamber: two views of a layer's hidden state, reconciled.

Fixes over the seed: the layer comes from the architecture table (not a GPT-2 path template), the
chamber follows the model's dtype (gated debate works in fp16/bf16), it is deterministic in eval mode
unless a random view is asked for, and `get_debate_info()` reads a bounded window of statistics that
were kept as tensors, so a forward pass never waits on the GPU.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import nn

from .. import ops
from ..plan.archs import ModelInfo
from ..plan.resolve import ConcreteSite
from ..runtime.hooks import HookSet, attach

HISTORY = 64  # statistics of the last calls kept for get_debate_info()


class _Recording(nn.Module):
    """Runs the chamber and keeps how far it moved the hidden state, as a tensor (no sync)."""

    def __init__(self, chamber: ops.Debate, history: deque) -> None:
        super().__init__()
        self.chamber = chamber
        self.history = history

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.chamber(h)
        with torch.no_grad():
            self.history.append(((out - h).norm() / h.norm().clamp_min(1e-12)).detach())
        return out


class SelfDebate:
    """Context manager: while enabled, block `layer_idx` (default N-4) runs a self-debate chamber."""

    def __init__(
        self,
        model: nn.Module,
        layer_idx: int | None = None,
        divergence_method: str = "projection",
        reconciliation_method: str = "gated",
        divergence_strength: float = 0.1,
    ) -> None:
        if divergence_method not in ("dropout", "noise", "projection"):
            raise ValueError(f"divergence_method must be dropout, noise or projection, not {divergence_method!r}")
        if divergence_method == "dropout" and not 0 <= divergence_strength < 1:
            raise ValueError(f"a dropout divergence_strength is a probability in [0, 1), not {divergence_strength}")
        if reconciliation_method not in ("average", "confidence", "gated"):
            raise ValueError(f"reconciliation_method must be average, confidence or gated, not {reconciliation_method!r}")
        self.model = model
        self.info = ModelInfo.from_model(model)
        n = self.info.num_layers
        self.layer_idx = n - 4 if layer_idx is None else (layer_idx + n if layer_idx < 0 else layer_idx)
        if not 0 <= self.layer_idx < n:
            raise ValueError(f"layer_idx {layer_idx} is out of range: this model has {n} layers (0..{n - 1})")
        self.divergence_method = divergence_method
        self.reconciliation_method = reconciliation_method
        self.divergence_strength = divergence_strength
        self.chamber = ops.Debate(self.info.hidden_size, reconciliation_method, divergence_method, divergence_strength)
        ops.place(self.chamber, model)
        self._history: deque = deque(maxlen=HISTORY)
        self._hooks: HookSet | None = None
        self.site = ConcreteSite("out", self.layer_idx, self.info.block(self.layer_idx))

    def enable(self) -> "SelfDebate":
        if self._hooks is None:
            self._hooks = attach(self.model, [self.site], [_Recording(self.chamber, self._history)])
        return self

    def disable(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    @property
    def enabled(self) -> bool:
        return self._hooks is not None

    def __enter__(self) -> "SelfDebate":
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    def get_debate_info(self) -> dict[str, Any]:
        """Settings and the mean relative change the chamber made over its last calls (at most HISTORY)."""
        recent = list(self._history)
        shift = torch.stack(recent).float().mean().item() if recent else None
        return {
            "layer_idx": self.layer_idx,
            "layer_path": self.site.module_path,
            "divergence_method": self.divergence_method,
            "reconciliation_method": self.reconciliation_method,
            "divergence_strength": self.divergence_strength,
            "enabled": self.enabled,
            "recent_calls": len(recent),
            "mean_relative_shift": shift,
        }
