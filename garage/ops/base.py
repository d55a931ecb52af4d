"""What every op shares: a [batch, seq, hidden] → same-shape nn.Module whose numbers live in buffers.

Numeric arguments are buffers (not Python floats) so that changing a strength after torch.compile
changes the result without recompiling.
"""

from __future__ import annotations

import torch
from torch import nn


class Op(nn.Module):
    """Base of all ops. Subclasses implement `forward(h) -> h'` over the last (hidden) dimension."""

    def scalar(self, name: str, value: float) -> None:
        self.register_buffer(name, torch.tensor(float(value)))

    def extra_repr(self) -> str:
        parts = [f"{name}={buf.item():g}" for name, buf in self.named_buffers(recurse=False) if buf.dim() == 0]
        return ", ".join(parts)


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The model's device, and its dtype when it is floating point: where injected ops must compute."""
    param = next(model.parameters())
    return param.device, (param.dtype if param.dtype.is_floating_point else None)


def place(module: nn.Module, model: nn.Module) -> nn.Module:
    """Move an op module onto the model's device and dtype (in place; it returns the module)."""
    device, dtype = placement(model)
    return module.to(device=device, dtype=dtype)
