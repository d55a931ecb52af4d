"""`LayerInjector`, the seed library's imperative API, kept thin over the hook backend and garage's ops.

Fixes over the seed: names are unique (a repeated name never leaks a hook), custom modules follow the
model's train/eval mode, device and dtype, noise is off in eval mode, and leaving the `with` block
restores the model exactly, also when the block raises. `to_spec()` and `compile()` lead from here to
the compiled API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import ops
from ..lang.diagnostics import GarageError
from ..plan.archs import ModelInfo
from ..plan.prepare import sites_named
from ..plan.resolve import ConcreteSite
from ..runtime.hooks import HookSet, attach
from ..runtime.injected import InjectedModel


@dataclass
class Injection:
    name: str
    kind: str
    site: ConcreteSite
    module: nn.Module
    op_text: str  # the op as .garage text, e.g. "scale 0.9" or "module adapter"
    bind: dict[str, Any] = field(default_factory=dict)
    hooks: HookSet | None = None


def _identifier(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return cleaned if cleaned[:1].isalpha() or cleaned[:1] == "_" else f"m_{cleaned}"


class LayerInjector:
    """Insert processing between layers of a live model through hooks; a context manager that cleans up."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.info = ModelInfo.from_model(model)
        self._injections: dict[str, Injection] = {}
        self._counter = 0

    # ------------------------------------------------------------------ where
    def site(self, layer: str | int) -> ConcreteSite:
        """One concrete site from a module path ("transformer.h.6"), a site ("h.6.mlp", "N-4") or a block index."""
        text = f"h.{layer}" if isinstance(layer, int) else str(layer)
        try:
            sites = sites_named(self.info, text)
        except GarageError as err:
            first = err.diagnostics[0]
            raise ValueError(f"cannot inject at {layer!r}: {first.message} ({first.hint})") from None
        if len(sites) != 1:
            raise ValueError(f"{layer!r} names {len(sites)} sites; LayerInjector takes one at a time")
        return sites[0]

    # ------------------------------------------------------------------ what
    def _add(self, kind: str, layer: str | int, module: nn.Module, op_text: str, name: str | None,
             bound: Any = None) -> str:
        """Hook `module` in at the layer. `op_text` may name `{ident}`, bound to `bound` in to_spec()."""
        site = self.site(layer)
        ops.place(module, self.model)
        name = self._unique(name or f"{kind}_{site.label}")
        ident = _identifier(name)
        bind = {ident: bound} if bound is not None else {}
        injection = Injection(name, kind, site, module, op_text.format(ident=ident), bind)
        injection.hooks = attach(self.model, [site], [module])
        self._injections[name] = injection
        return name

    def _unique(self, name: str) -> str:
        base, n = name, 1
        while name in self._injections:
            n += 1
            name = f"{base}_{n}"
        return name

    def inject(self, layer: str | int, module: nn.Module, name: str | None = None) -> str:
        """h ← module(h) at the layer's output. Returns the injection's (unique) name."""
        return self._add("custom", layer, module, "module {ident}", name, bound=module)

    inject_custom_layer = inject

    def inject_identity(self, layer: str | int, name: str | None = None) -> str:
        return self._add("identity", layer, ops.REGISTRY["identity"](), "module identity", name)

    def inject_scaling(self, layer: str | int, scale: float, name: str | None = None) -> str:
        return self._add("scaling", layer, ops.Scale(scale), f"scale {float(scale)!r}", name)

    def inject_additive(self, layer: str | int, vector: torch.Tensor, scale: float = 1.0, name: str | None = None) -> str:
        return self._add("additive", layer, ops.Add(vector, factor=scale), f"add {{ident}} * {float(scale)!r}", name, bound=vector)

    def inject_noise(self, layer: str | int, std: float = 0.01, name: str | None = None, always: bool = False) -> str:
        """Gaussian noise in training mode (or always, if asked): the seed left it on in eval mode."""
        text = f"noise {float(std)!r}" + (" always" if always else "")
        return self._add("noise", layer, ops.Noise(std, always), text, name)

    # ------------------------------------------------------------------ housekeeping
    def remove(self, name: str) -> None:
        injection = self._injections.pop(name)
        if injection.hooks is not None:
            injection.hooks.remove()

    def remove_all(self) -> None:
        for name in list(self._injections):
            self.remove(name)

    def list_injections(self) -> list[dict[str, Any]]:
        return [
            {"name": i.name, "type": i.kind, "layer": i.site.module_path, "site": i.site.label,
             "module": type(i.module).__name__}
            for i in self._injections.values()
        ]

    def __enter__(self) -> "LayerInjector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_all()

    def __len__(self) -> int:
        return len(self._injections)

    # ------------------------------------------------------------------ the way to the compiled API
    def to_spec(self) -> str:
        """The equivalent .garage text, one statement per injection in the order they apply."""
        return "".join(f"at {i.site.label} {i.op_text}\n" for i in self._injections.values())

    def bindings(self) -> dict[str, Any]:
        """The tensors and modules that `to_spec()` names."""
        return {k: v for i in self._injections.values() for k, v in i.bind.items()}

    def compile(self, **kwargs: Any) -> InjectedModel:
        """The equivalent InjectedModel (a graph rewrite), built from `to_spec()` and `bindings()`."""
        from ..compiler import compile

        return compile(self.model, self.to_spec(), bind=self.bindings(), **kwargs)
