from __future__ import annotations

from torch import nn


class Wrapper(nn.Module):
    """An op that limits where another op acts (some positions, some heads); `inner` is the op itself."""

    inner: nn.Module

    @property
    def observes_only(self) -> bool:
        """True when the wrapped op only records (a capture), so that the value passes through unchanged."""
        return getattr(self.inner, "observes_only", False)


def innermost(module: nn.Module) -> nn.Module:
    """The op a stack of wrappers wraps."""
    while isinstance(module, Wrapper):
        module = module.inner
    return module


def takes_positions(module: nn.Module) -> bool:
    """Whether an op is called with the position inputs (attention mask, prompt lengths, position ids,
    input ids) after h: position-limited ops and sequence blades."""
    return bool(getattr(module, "takes_positions", False))
