"""`module NAME(k=v, …)`: a built-in, a class registered with `garage.register`, or a module bound by name."""

from __future__ import annotations

import torch
from torch import nn

from .base import Op
from .noise import Noise


class Identity(Op):
    """h unchanged: a placeholder, and the null op for differential tests."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


class LayerNormModule(Op):
    """Re-normalizes h over the hidden dimension (no learned affine)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(h, h.shape[-1:], eps=self.eps)


REGISTRY: dict[str, type[nn.Module]] = {
    "noise": Noise,  # `module noise(std=0.02)`: the seed's ActivationNoise
    "identity": Identity,
    "layernorm": LayerNormModule,
}


def register(name: str, module_class: type[nn.Module]) -> type[nn.Module]:
    """Make `module_class` nameable in specs as `module NAME(k=v, …)`; its kwargs come from the spec."""
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"garage.register takes an nn.Module subclass, not {module_class!r}")
    if not name.isidentifier():
        raise ValueError(f"module name {name!r} must be a name: letters, digits and _")
    REGISTRY[name] = module_class
    return module_class
