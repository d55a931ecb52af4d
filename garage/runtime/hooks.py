"""The hook backend: the same op modules, applied by forward hooks on the eager model.

It is the reference the graph backend is tested against, and the base of the seed-compatible API.
Hooks are the only thing it adds to the model, and `remove()` takes every one of them away again. (A router's
logits are made and read inside the router, out of a hook's reach: there, hooks switch on a torch-function
mode for the router's forward only.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..ops import takes_positions
from ..plan.archs import stack_modules
from ..plan.resolve import INPUT_KINDS, ConcreteSite

Run = Callable[[torch.Tensor], torch.Tensor]  # the ops of one site, applied in order
BLOCK_KINDS = ("in", "out", "attn", "cross", "mlp", "mlp.hidden", "attn.heads", "final")  # on every call's path


@dataclass
class CallContext:
    """Per-call facts that position-limited ops need: the attention mask, and prompt lengths when generating."""

    attention_mask: torch.Tensor | None = None
    prompt_length: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None


def apply_ops(modules: Iterable[nn.Module], h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
    for module in modules:
        if takes_positions(module):
            h = module(h, ctx.attention_mask, ctx.prompt_length, None, ctx.input_ids)
        else:
            h = module(h)
    return h


def _replace_hidden(output: Any, fn: Run) -> Any:
    """Apply fn to the hidden state inside a module's output: a tensor, or the first item of a tuple, list or
    ModelOutput."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, (tuple, list)):  # openai-gpt's blocks return a list, Reformer's a namedtuple
        items = [fn(output[0]), *output[1:]]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    if hasattr(output, "to_tuple") and len(output) > 0:  # a ModelOutput
        key = next(iter(output.keys()))
        output[key] = fn(output[key])
        return output
    if isinstance(output, dict) and output:  # SqueezeBERT's attention returns {"context_layer": …}
        key = next(iter(output))
        return {**output, key: fn(output[key])}
    raise TypeError(f"cannot find a hidden state in a {type(output).__name__} output")


@dataclass
class HookSet:
    """The hooks attached for one plan; a context manager that removes them all on exit."""

    model: nn.Module
    handles: list[RemovableHandle] = field(default_factory=list)
    ctx: CallContext = field(default_factory=CallContext)
    sites: dict[tuple[str, str], ConcreteSite] = field(default_factory=dict)  # the sites hooked, by key
    ran: set[tuple[str, str]] = field(default_factory=set)  # the sites whose hooks have run

    def check_ran(self) -> None:
        """A RuntimeError naming the block sites whose hooks never ran in the calls so far: a model that calls a
        module's `forward` directly (SqueezeBERT's encoder calls its blocks so) runs no hooks there, and the
        spec would silently do nothing."""
        missed = [site.label for key, site in self.sites.items() if key not in self.ran and site.kind in BLOCK_KINDS]
        if missed:
            raise RuntimeError(f"the hooks at {', '.join(missed)} never ran: this model calls those modules' forward "
                               "directly, past their hooks, so the spec cannot act there by hooks; use garage.compile, "
                               "whose graph places these sites")

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(model: nn.Module, sites: Sequence[ConcreteSite], modules: Sequence[nn.Module]) -> HookSet:
    """Hook `modules[i]` onto `sites[i]`; ops at the same site run in the order given."""
    hooks = HookSet(model)
    grouped: dict[tuple[str, str], list[nn.Module]] = {}
    widths: dict[tuple[str, str], int | None] = {}
    stacks: dict[tuple[str, str], str] = {}
    for site, module in zip(sites, modules):
        grouped.setdefault(site.key, []).append(module)
        widths[site.key] = site.width
        stacks[site.key] = site.stack

    contexts = {"": hooks.ctx}
    positional = {site.stack for site, m in zip(sites, modules) if takes_positions(m)}
    if "" in positional:
        hooks.handles.append(model.register_forward_pre_hook(_remember(hooks.ctx), with_kwargs=True))
    for name, stack in stack_modules(model).items():  # an encoder–decoder model: each stack's own tokens
        contexts[name] = CallContext()
        if name in positional:
            hooks.handles.append(stack.register_forward_pre_hook(_remember(contexts[name], stack=True), with_kwargs=True))

    named = dict(model.named_modules())
    hooks.sites = {site.key: site for site in sites}
    for (kind, path), group in grouped.items():
        target = named[path]
        run = _runner(group, target, contexts[stacks[kind, path]], functools.partial(hooks.ran.add, (kind, path)))
        if kind == "router":
            hooks.handles += _router_hooks(target, run, widths[kind, path] or 0)
        elif kind in INPUT_KINDS:
            hooks.handles.append(target.register_forward_pre_hook(_pre_hook(run), with_kwargs=True))
        else:
            hooks.handles.append(target.register_forward_hook(lambda _m, _a, out, run=run: _replace_hidden(out, run)))
    return hooks


def _remember(ctx: CallContext, stack: bool = False) -> Callable[..., None]:
    """A pre-hook that keeps a call's mask, ids and prompt lengths in `ctx`. On a stack of an encoder–decoder
    model, whose decoder is called without a mask while generating, a missing mask is all ones over the cache
    and the new tokens, so that positions count from the first target token."""

    def remember(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None  # not audio features
        past = _past_length(kwargs)
        if stack and not isinstance(mask, torch.Tensor) and ids is not None:
            mask = torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.long, device=ids.device)
        ctx.attention_mask = mask if isinstance(mask, torch.Tensor) else None
        ctx.input_ids = ids
        if past == 0:  # a new prompt: its real tokens are the [prompt] positions
            ctx.prompt_length = _real_tokens(ctx.attention_mask, ids)

    return remember


def _real_tokens(mask: torch.Tensor | None, ids: Any) -> torch.Tensor | None:
    """Per row, how many real (unpadded) tokens a prompt has."""
    if mask is not None:
        return mask.sum(-1)
    if isinstance(ids, torch.Tensor):
        return torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
    return None


def _past_length(kwargs: dict) -> int:
    """How many tokens the KV cache passed to this call already holds (0 without a cache)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


def _runner(group: list[nn.Module], target: nn.Module, ctx: CallContext, ran: Callable[[], None]) -> Run:
    def run(h: torch.Tensor) -> torch.Tensor:
        ran()
        for module in group:
            if module.training != target.training:
                module.train(target.training)
        return apply_ops(group, h, ctx)

    return run


class _FirstValue(TorchFunctionMode):
    """While a router runs: rewrite the first [tokens, width] value it computes (its logits) before any of
    its own code reads it. Hooks on the router's output would come too late: the routing is decided inside."""

    def __init__(self, run: Run, width: int, tokens: int) -> None:
        super().__init__()
        self.run, self.width, self.tokens, self.done = run, width, tokens, False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if (not self.done and isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() in (2, 3)
                and out.shape[-1] == self.width and out.numel() == self.tokens * self.width):
            self.done = True
            out = self.run(out)
        return out


def _router_hooks(router: nn.Module, run: Run, experts: int) -> list[RemovableHandle]:
    """A pre-hook that enters a _FirstValue mode for the router's forward, and a hook that always leaves it."""
    active: list[_FirstValue] = []

    def enter(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        active.append(_FirstValue(run, experts, h.numel() // h.shape[-1]))
        active[-1].__enter__()

    def leave(_module: nn.Module, _args: tuple[Any, ...], _out: Any) -> None:
        active.pop().__exit__(None, None, None)

    return [router.register_forward_pre_hook(enter, with_kwargs=True),
            router.register_forward_hook(leave, always_call=True)]


def _pre_hook(run: Run) -> Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]:
    """Rewrite a block's incoming hidden state, passed positionally or as `hidden_states=`."""

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (run(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": run(kwargs["hidden_states"])}

    return hook
