"""Worker side: the served specs' ops inside vLLM's model, installed before vLLM compiles it.

vLLM flattens a step's requests into one `[num_tokens, hidden]` batch. Before each forward, the model
runner's `_prepare_inputs` (wrapped by `patch_runner`) writes three per-token facts into the model's
`TokenTable` buffers: the spec its request chose (0 for none), its absolute position, and its request's
prompt length. Each injected site is a `SiteOps` module that applies, for each statement, the op to the
tokens whose spec and position it names (`torch.where`), so one graph serves a batch that mixes specs.
The buffers keep their addresses, so vLLM's compiled graph (and a CUDA graph) reads them live.

Sites map onto vLLM's module tree by kind (`HOOKS`). vLLM's decoder layers return `(hidden, residual)`
and fuse the residual add into the next layer's RMSNorm, so a block's output `h.I` is their sum: the hook
computes it, applies the ops and hands on `(h, 0)` for the tokens they chose, which the next norm sums to
`h` again; every other token keeps its own pair, untouched.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import ops
from ..lang.parse import parse_collect
from .plan import (
    CONFIG_KEY,
    FAMILIES,
    REQUEST_KEY,
    ServePlan,
    check_spec,
    read_plan,
    skeleton,
    values_digest,
    vllm_path,
)

Rule = tuple[str, int | None, int | None]  # a position selection: (kind, start, stop), as ops.AtPositions holds it


class TokenTable(nn.Module):
    """Per-token facts of the step being run, refilled in place before each forward."""

    spec: torch.Tensor
    pos: torch.Tensor
    prompt: torch.Tensor

    def __init__(self, size: int, plan: ServePlan, device: torch.device) -> None:
        super().__init__()
        self.plan = plan
        self.rows = {name: plan.index(name) for name in plan.names}  # looked up for every request at every step
        self.steps: dict[int, list[nn.Module]] = {}  # each spec's ops in plan order, as `inj.ops` holds them
        for name in ("spec", "pos", "prompt"):
            self.register_buffer(name, torch.zeros(size, dtype=torch.long, device=device), persistent=False)

    def spec_of(self, params: Any) -> int:
        """The spec row a request's SamplingParams choose (the engine's front end refused unknown names)."""
        name = ((getattr(params, "extra_args", None) or {}).get(REQUEST_KEY)) if params is not None else None
        return self.rows.get(name, 0) if isinstance(name, str) else 0

    def fill(self, spec: np.ndarray, pos: np.ndarray, prompt: np.ndarray) -> None:
        """Write one step's facts; rows past its tokens (a CUDA graph's padding) run the plain model."""
        n = len(spec)
        for buffer, values in ((self.spec, spec), (self.pos, pos), (self.prompt, prompt)):
            buffer[:n].copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)), non_blocking=True)
        self.spec[n:].zero_()


def selected(rule: Rule, pos: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Which tokens a position rule names, from absolute positions and prompt lengths: garage's meaning
    (docs/language.md), where `[last]` is the prompt's last token and every generated one."""
    kind, start, stop = rule
    if kind == "last":
        return pos >= prompt - 1
    if kind == "prompt":
        return pos < prompt
    if kind == "new":
        return pos >= prompt
    first = start or 0
    end = first + 1 if kind == "index" else stop
    chosen = pos >= first
    return chosen if end is None else chosen & (pos < end)


class SiteOps(nn.Module):
    """Every statement of every served spec at one site, each applied to its own spec's tokens."""

    def __init__(self, table: TokenTable, entries: list[tuple[int, Rule | None, nn.Module]]) -> None:
        super().__init__()
        self.table = table
        self.specs = [k for k, _, _ in entries]
        self.rules = [rule for _, rule, _ in entries]
        self.ops = nn.ModuleList([op for _, _, op in entries])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.changed(h)[0]

    def changed(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new values, and a [tokens, 1] mask of the tokens any statement chose."""
        n = h.shape[0]
        spec, pos, prompt = self.table.spec[:n], self.table.pos[:n], self.table.prompt[:n]
        touched = torch.zeros_like(spec, dtype=torch.bool).unsqueeze(-1)
        for k, rule, op in zip(self.specs, self.rules, self.ops):
            chosen = spec == k
            if rule is not None:
                chosen = chosen & selected(rule, pos, prompt)
            chosen = chosen.unsqueeze(-1)
            h = torch.where(chosen, op(h).to(h.dtype), h)
            touched = touched | chosen
        return h, touched


def _on_sum(sites: SiteOps, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ops on a block boundary `hidden + residual`: a chosen token moves on as (h, 0), which the next
    fused add-norm sums back to h; every other token keeps its own (hidden, residual) pair, so the plain
    model's fused kernel (which may add in float32 before it rounds) sees exactly what it would have."""
    h, touched = sites.changed(hidden + residual)
    return torch.where(touched, h, hidden), torch.where(touched, torch.zeros_like(residual), residual)


def _block_out(module: nn.Module, sites: SiteOps) -> None:
    def hook(_: nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> Any:
        return _on_sum(sites, *output)
    module.register_forward_hook(hook)


def _block_in(module: nn.Module, sites: SiteOps) -> None:
    def hook(_: nn.Module, args: tuple[Any, ...]) -> Any:
        positions, hidden, residual, *rest = args
        if residual is None:  # block 0: the embeddings, before any residual exists
            return (positions, sites(hidden), None, *rest)
        return (positions, *_on_sum(sites, hidden, residual), *rest)
    module.register_forward_pre_hook(hook)


def _output(module: nn.Module, sites: SiteOps) -> None:
    def hook(_: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # the final norm called with a residual returns (normed, residual)
            return (sites(output[0]), *output[1:])
        return sites(output)
    module.register_forward_hook(hook)


def _input(module: nn.Module, sites: SiteOps) -> None:
    def hook(_: nn.Module, args: tuple[Any, ...]) -> Any:
        return (sites(args[0]), *args[1:])
    module.register_forward_pre_hook(hook)


# A site kind → how its value is reached on the vLLM module at the site's path (transformers' path, renamed
# where vLLM names it otherwise: plan.RENAMES): model.layers.I, .self_attn, .self_attn.o_proj, .mlp,
# .mlp.down_proj, .mlp.gate (the router, whose first output is the logits), model.norm.
HOOKS: dict[str, Callable[[nn.Module, SiteOps], None]] = {
    "out": _block_out, "in": _block_in, "attn": _output, "mlp": _output, "final": _output, "router": _output,
    "attn.heads": _input, "mlp.hidden": _input,
}


def _as_buffers(module: nn.Module) -> nn.Module:
    """Parameters (an `add learn` vector) as buffers: vLLM's loader requires every parameter in the checkpoint."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach())
    return module


def table_size(vllm_config: Any) -> int:
    """The most tokens one forward can hold: a step's token budget, or a CUDA graph's padded batch."""
    sizes = [vllm_config.scheduler_config.max_num_batched_tokens, vllm_config.scheduler_config.max_num_seqs]
    sizes.append(getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0)
    return int(max(sizes))


def install(model: nn.Module, vllm_config: Any) -> None:
    """Build every served spec's ops with garage's own front half and hook them into vLLM's model."""
    from . import UNSERVED_WHY

    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1 or vllm_config.speculative_config:
        raise ValueError(f"garage.vllm does not serve specs with tensor or pipeline parallelism or speculative "
                         f"decoding yet: {UNSERVED_WHY}")
    hf_config = vllm_config.model_config.hf_config
    plan, bind = read_plan(getattr(hf_config, CONFIG_KEY))
    reference = skeleton(hf_config)
    param = next(model.parameters())
    table = TokenTable(table_size(vllm_config), plan, param.device)
    groups: dict[tuple[str, str], list[tuple[int, Rule | None, nn.Module]]] = defaultdict(list)
    for k, served in enumerate(plan.specs, start=1):
        spec, _ = parse_collect(served.text, served.filename)
        prepared = check_spec(reference, spec, bind)
        if values_digest(prepared.modules) != served.values:
            raise ValueError(f"garage spec {served.name!r} holds other values than when it was checked at start-up "
                             f"(a vector file it reads changed?): start the engine again")
        for step, module in zip(prepared.plan, prepared.modules):
            rule = None
            if isinstance(module, ops.AtPositions):
                rule, module = (module.kind, module.start, module.stop), module.inner
            assert module is not None
            op = _as_buffers(module).to(device=param.device, dtype=param.dtype).eval()
            groups[(step.site.kind, vllm_path(hf_config.model_type, step.site.module_path))].append((k, rule, op))
            table.steps.setdefault(k, []).append(op)
    modules = dict(model.named_modules())
    for (kind, path), entries in groups.items():
        sites = SiteOps(table, entries)
        target = modules[path]
        target.add_module("garage_" + kind.replace(".", "_"), sites)  # inside the tree vLLM compiles
        HOOKS[kind](target, sites)
    object.__setattr__(model, "garage_tokens", table)  # the runner finds it here (not a second registration)
    patch_runner()


def set_value(table: TokenTable, spec: str, step: int, name: str, value: Any) -> None:
    """Write a new value into one op's buffer in place (its address, and so the compiled graph, unchanged)."""
    if spec not in table.plan.names:
        raise ValueError(f"unknown garage spec {spec!r}: this engine serves {', '.join(table.plan.names)}")
    steps = table.steps.get(table.plan.index(spec), [])
    if not 0 <= step < len(steps):
        raise ValueError(f"spec {spec!r} has {len(steps)} steps (0..{len(steps) - 1}), not {step}: "
                         "`garage explain` lists them in order")
    op = ops.innermost(steps[step])
    buffer = op._buffers.get(name)
    if buffer is None:
        raise ValueError(f"step {step} of {spec!r} is {type(op).__name__}, whose values are "
                         f"{', '.join(op._buffers) or 'none'}, not {name!r}")
    new = torch.as_tensor(value, dtype=buffer.dtype, device=buffer.device)
    if new.shape != buffer.shape:
        raise ValueError(f"{name} of step {step} of {spec!r} has shape {list(buffer.shape)}, not {list(new.shape)}")
    buffer.copy_(new)


def fill_tokens(runner: Any, num_scheduled_tokens: np.ndarray) -> None:
    """One step's per-token facts, from the same batch state vLLM's `GPUModelRunner._prepare_inputs`
    (vllm/v1/worker/gpu_model_runner.py) reads: `input_batch` rows in order, each scheduling
    `num_scheduled_tokens[row]` tokens from `num_computed_tokens_cpu[row]` on, so positions are absolute also
    under chunked prefill and after a preempted request is recomputed."""
    table: TokenTable | None = getattr(runner.get_model(), "garage_tokens", None)
    if table is None:
        return
    batch = runner.input_batch
    rows = batch.num_reqs
    counts = np.asarray(num_scheduled_tokens[:rows])
    row_of = np.repeat(np.arange(rows), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    pos = batch.num_computed_tokens_cpu[row_of] + (np.arange(len(row_of)) - starts)
    row_spec = np.array([table.spec_of(runner.requests[rid].sampling_params) for rid in batch.req_ids[:rows]],
                        dtype=np.int64)
    table.fill(row_spec[row_of], pos, batch.num_prompt_tokens[row_of])


def patch_runner() -> None:
    """Wrap the model runner's input preparation (once per process) so each step fills the token table."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "garage", False):
        return

    @functools.wraps(original)
    def _prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        out = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        fill_tokens(self, num_scheduled_tokens)
        return out

    _prepare_inputs.garage = True  # type: ignore[attr-defined]
    GPUModelRunner._prepare_inputs = _prepare_inputs


def served_class(base: type) -> type:
    """vLLM's class for a family, with the plan's ops installed once its modules exist."""

    class Served(base):
        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            install(self, vllm_config)

    Served.__name__ = Served.__qualname__ = "Garage" + base.__name__
    return Served


def served_classes() -> dict[str, type]:
    import importlib

    found = {}
    for module_name, class_name in FAMILIES.values():
        base = getattr(importlib.import_module(f"vllm.model_executor.models.{module_name}"), class_name)
        found["Garage" + class_name] = served_class(base)
    return found
