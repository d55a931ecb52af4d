"""Shape checks on fake tensors: every user module runs on its site's fake value, with symbolic batch and
sequence, so a module that would break the model is reported before any real tensor is computed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import ops
from .._compat import fake_mode_of, fake_tensor_limits, statically_known_true
from ..fx.locate import HiddenShape
from ..lang.diagnostics import Problem, Span

View = Callable[[torch.Tensor], torch.Tensor]


def user_module(module: nn.Module) -> tuple[nn.Module, str, View] | None:
    """The part of an op that is user code (a bound, registered or source module), what it must return, and
    what it sees of the site's value (the chosen heads, at an attn.heads site)."""
    inner = ops.innermost(module)
    heads = next((m for m in module.modules() if isinstance(m, ops.Heads)), None)
    view: View = heads.select if heads is not None else (lambda h: h)
    if isinstance(inner, ops.Blade) and isinstance(inner.source, ops.ModuleSource):
        return inner.source.module, "blade", view
    if isinstance(inner, ops.Op):  # garage's own ops keep the shape by construction
        return None
    return inner, "module", view


def _same(a: torch.Size, b: torch.Size) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def check_module(module: nn.Module, role: str, site_value: torch.Tensor, names: HiddenShape, span: Span,
                 view: View = lambda h: h) -> None:
    """Run `module` on what it sees of the fake `site_value`; raise Problem if its output cannot replace (or,
    for a blade, add to) that."""
    what = f"{'blade source module' if role == 'blade' else 'module'} {type(module).__name__}"
    with fake_mode_of(site_value) as mode:
        if mode is None:  # a real tensor: nothing was traced, nothing to check
            return
        value = view(site_value)
        try:
            with torch.no_grad():
                out = module(value)
        except fake_tensor_limits() as err:  # fake tensors cannot run it; that is not the module's fault
            raise Problem(span, f"the shape of {what} could not be checked before running: "
                          f"{type(err).__name__} (it branches on values, or uses an operator fake tensors lack)",
                          "it is checked when it first runs; make it shape-static to have it checked here",
                          "warning", "unchecked-shape") from None
        except Exception as err:  # user code: any failure is the user's to see, with the statement it came from
            raise Problem(span, f"{what} fails on a {names.describe(value)} input: "
                          f"{type(err).__name__}: {err}".rstrip(),
                          "make it map [batch, seq, hidden] to the same shape") from None
    expected = names.describe(value)
    if not isinstance(out, torch.Tensor):
        raise Problem(span, f"{what} returns a {type(out).__name__}, not a tensor",
                      f"return one {expected} tensor")
    fits = _same(out.shape, value.shape) or (role == "blade" and _same(out.shape, value.shape[-1:]))
    if not fits:
        raise Problem(span, f"{what} maps {expected} to {names.describe(out)}",
                      f"it must return {expected}: the site's shape (a `{role}` cannot change the hidden size)")
    if out.dtype != value.dtype:
        raise Problem(span, f"{what} returns {str(out.dtype)[6:]}, "
                      f"but the site holds {str(value.dtype)[6:]}", f"cast its output, or move it with .to({value.dtype})")
