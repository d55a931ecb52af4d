"""`LayerInjector`, the seed library's imperative API, kept thin over the hook backend and garage's ops.

The seed's signatures and defaults are kept: `inject` takes a module or any callable h → h',
`inject_additive` a tensor or a float, `inject_scaling` scales by 0.9 unless told, `inject_noise` adds
`noise_scale` noise always (as the seed did; `always=False` limits it to training mode, as the
language's `noise` does), `list_injections()` gives the names, and `quick_inject` is one call.

Fixes over the seed: names are unique (a repeated name never leaks a hook), custom modules follow the
model's train/eval mode, device and dtype, and leaving the `with` block restores the model exactly, also
when the block raises. `to_spec()` and `compile()` lead from here to the compiled API; a plain callable
has no spec form, and `to_spec()` says so with a warning naming it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .. import ops
from ..lang.diagnostics import GarageError, GarageWarning
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
    op_text: str | None  # the op as .garage text, e.g. "scale 0.9" or "module adapter"; None: no spec form
    bind: dict[str, Any] = field(default_factory=dict)
    hooks: HookSet | None = None


class CallableOp(nn.Module):
    """A plain function h → h' run as an op (the seed's `inject` took any callable). It has no spec form."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)


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
    def _add(self, kind: str, layer: str | int, module: nn.Module, op_text: str | None, name: str | None,
             bound: Any = None) -> str:
        """Hook `module` in at the layer. `op_text` may name `{ident}`, bound to `bound` in to_spec()."""
        site = self.site(layer)
        ops.place(module, self.model)
        name = self._unique(name or f"{kind}_{site.label}")
        ident = _identifier(name)
        bind = {ident: bound} if bound is not None else {}
        text = op_text.format(ident=ident) if op_text is not None else None
        injection = Injection(name, kind, site, module, text, bind)
        injection.hooks = attach(self.model, [site], [module])
        self._injections[name] = injection
        return name

    def _unique(self, name: str) -> str:
        base, n = name, 1
        while name in self._injections:
            n += 1
            name = f"{base}_{n}"
        return name

    def inject(self, layer: str | int, module: nn.Module | Callable[[torch.Tensor], torch.Tensor],
               name: str | None = None) -> str:
        """h ← module(h) at the layer's output; `module` is an nn.Module or any callable h → h'. Returns the
        injection's (unique) name."""
        if isinstance(module, nn.Module):
            return self._add("custom", layer, module, "module {ident}", name, bound=module)
        if not callable(module):
            raise TypeError(f"inject takes an nn.Module or a callable h → h', not a {type(module).__name__}")
        return self._add("callable", layer, CallableOp(module), None, name)

    inject_custom_layer = inject

    def inject_identity(self, layer: str | int, name: str | None = None) -> str:
        return self._add("identity", layer, ops.REGISTRY["identity"](), "module identity", name)

    def inject_scaling(self, layer: str | int, scale: float = 0.9, name: str | None = None) -> str:
        return self._add("scaling", layer, ops.Scale(scale), f"scale {float(scale)!r}", name)

    def inject_additive(self, layer: str | int, bias: torch.Tensor | float, scale: float = 1.0,
                        name: str | None = None) -> str:
        """h ← h + scale·bias, with bias a vector of the site's width or one number for every unit."""
        if isinstance(bias, (int, float)):
            site = self.site(layer)
            bias = torch.full((site.op_width or self.info.hidden_size,), float(bias))
        return self._add("additive", layer, ops.Add(bias, factor=scale), f"add {{ident}} * {float(scale)!r}", name,
                         bound=bias)

    def inject_noise(self, layer: str | int, noise_scale: float = 0.01, name: str | None = None, *,
                     always: bool = True, std: float | None = None) -> str:
        """Gaussian noise of std `noise_scale` (`std` is the same), always, as the seed added it; with
        `always=False`, in training mode only, as the language's `noise` does."""
        scale = noise_scale if std is None else std
        text = f"noise {float(scale)!r}" + (" always" if always else "")
        return self._add("noise", layer, ops.Noise(scale, always), text, name)

    # ------------------------------------------------------------------ housekeeping
    def remove(self, name: str) -> None:
        injection = self._injections.pop(name)
        if injection.hooks is not None:
            injection.hooks.remove()

    def remove_all(self) -> None:
        for name in list(self._injections):
            self.remove(name)

    def list_injections(self) -> list[str]:
        """The names of the active injections, in the order they were made (as the seed returned them)."""
        return list(self._injections)

    def describe(self) -> list[dict[str, Any]]:
        """Each active injection: its name, type, module path, site and module class."""
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
        """The equivalent .garage text, one statement per injection in the order they apply. A plain
        callable has no spec form: it is left out, with a GarageWarning naming it."""
        for i in self._injections.values():
            if i.op_text is None:
                warnings.warn(f"injection {i.name!r} ({i.module.extra_repr()}) is a plain callable: it has no .garage "
                              "form and is left out of to_spec(); wrap it in an nn.Module to bind it as `module NAME`",
                              GarageWarning, stacklevel=2)
        return "".join(f"at {i.site.label} {i.op_text}\n" for i in self._injections.values() if i.op_text is not None)

    def bindings(self) -> dict[str, Any]:
        """The tensors and modules that `to_spec()` names."""
        return {k: v for i in self._injections.values() for k, v in i.bind.items()}

    def compile(self, **kwargs: Any) -> InjectedModel:
        """The equivalent InjectedModel (a graph rewrite), built from `to_spec()` and `bindings()`."""
        from ..compiler import compile

        return compile(self.model, self.to_spec(), bind=self.bindings(), **kwargs)


def quick_inject(model: nn.Module, layer_idx: int | str, fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
                 name: str | None = None) -> LayerInjector:
    """One injection in one call: a LayerInjector holding `fn` at the layer, to use as a context manager
    (`with quick_inject(model, 6, fn): ...`) or to `remove_all()` later."""
    injector = LayerInjector(model)
    injector.inject(layer_idx, fn, name)
    return injector
