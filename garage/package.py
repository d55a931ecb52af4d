"""InjectedModel: the injected graph packaged to be called like the Hugging Face model it came from."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.experimental import _config as fx_config

from . import artifact
from .diagnostics import Diagnostic, ValidationError
from .formatter import format_op
from .locate import SiteNotFound
from .resolve import Plan
from .rewrite import POSITION_INPUTS, Inserted, inject
from .generate import Sampling, decode_loop, export_step
from .trace import SCORING, Signature, base_graph, cached_graph, causal_path_possible, export_unpadded, materialize, signature

STEP_PREFIX = "model."  # the generation steps and the unpadded scoring graph wrap the model as `self.model`

# Forward kwargs the scoring graph has baked in; passing them with these values is harmless.
_BAKED = {"use_cache": (False, None), "return_dict": (True, None), "output_hidden_states": (False, None),
          "output_attentions": (False, None)}


_EXPORTERS: dict[str, Callable[[nn.Module], GraphModule]] = {
    "prefill": lambda model: export_step(model, decode=False),
    "decode": lambda model: export_step(model, decode=True),
    "unpadded": export_unpadded,
}

# Per graph kind, the dynamic dimensions of each positional input (the scoring graph takes kwargs).
_STEP_DIMS = {
    "prefill": ((0, 1), (0, 1), (0, 1), (0,), ()),
    "decode": ((0,), (0, 1), (0,), (0,), (), ()),  # one token; its mask spans the whole cache
}


def mark_dynamic(kind: str, args: tuple, kwargs: dict) -> None:
    """Mark batch and length dimensions dynamic before a compiled call, so no new size recompiles."""
    for tensor in kwargs.values():
        for dim in range(min(tensor.dim(), 2)):
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
    for value, dims in zip(args, _STEP_DIMS.get(kind, ())):
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(value, dim)
    if kind in _STEP_DIMS and len(args) > 4:
        for buffer in args[-1]:  # the cache: batch and length
            torch._dynamo.maybe_mark_dynamic(buffer, 0)
            torch._dynamo.maybe_mark_dynamic(buffer, 2)


class InjectedModel(nn.Module):
    """The model with a spec compiled in. Its only parameters are the injected ops' parameters."""

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        modules: list[nn.Module],
        captures: dict[str, torch.Tensor],
        compile: bool | dict = False,
        warnings: list | None = None,
        scoring_graph: tuple[GraphModule, list[Inserted]] | None = None,
    ) -> None:
        """`scoring_graph` is the injected default scoring graph when the validator has already built it."""
        super().__init__()
        self.ops = nn.ModuleList(modules)
        object.__setattr__(self, "model", model)  # not a submodule: its parameters are not ours
        self.plan = plan
        self.captures = captures
        self.warnings = list(warnings or [])
        self._compile_options = ({} if compile is True else dict(compile)) if compile else None
        # keyed by a scoring input signature, or "prefill" / "decode"
        self._graphs: dict[Signature | str, GraphModule] = {}
        self._runners: dict[Signature | str, Callable[..., Any]] = {}
        self._inserted: dict[Signature | str, list[Inserted]] = {}
        self._causal_path = causal_path_possible(model)
        self.train(model.training)
        if scoring_graph is not None:
            self._graphs[SCORING], self._inserted[SCORING] = scoring_graph
        self._runner(SCORING)

    # ------------------------------------------------------------------ graphs
    def _runner(self, sig: Signature) -> Callable[..., Any]:
        if sig not in self._runners:
            if sig not in self._graphs:
                base = base_graph(self.model, sig)
                self._graphs[sig], self._inserted[sig] = inject(
                    base, [s.site for s in self.plan], list(self.ops), self.plan.info.hidden_size)
            self._runners[sig] = self._maybe_compiled(self._graphs[sig], "scoring")
        return self._runners[sig]

    def _maybe_compiled(self, gm: GraphModule, kind: str) -> Callable[..., Any]:
        if self._compile_options is None:
            return gm
        materialize(gm)  # dynamo does not trace a lazily generated forward
        compiled = torch.compile(gm, fullgraph=True, **self._compile_options)

        def run(*args: Any, **kwargs: Any) -> Any:
            # Batch and lengths are dynamic from the first call, and size-1 dimensions stay symbolic, so a
            # new length, batch 1, or the next decode step never recompiles.
            mark_dynamic(kind, args, kwargs)
            with fx_config.patch(backed_size_oblivious=True):
                return compiled(*args, **kwargs)

        return run

    @property
    def graph_module(self) -> GraphModule:
        """The injected GraphModule for input_ids + attention_mask (its `.code` is readable Python)."""
        self._runner(SCORING)
        return self._graphs[SCORING]

    # ------------------------------------------------------------------ calling
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        inputs: dict[str, torch.Tensor] = {}
        for name, value in {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}.items():
            if isinstance(value, torch.Tensor):
                inputs[name] = value
            elif name in _BAKED and value in _BAKED[name]:
                continue
            elif value is not None:
                raise TypeError(f"InjectedModel does not take {name}={value!r}: the scoring graph has it baked in")
        if "input_ids" not in inputs:
            raise TypeError("InjectedModel needs input_ids")
        self.captures.clear()
        if self._unpadded(inputs):  # no padding: SDPA's causal path, with no mask materialized
            return self._step_runner("unpadded")(input_ids=inputs["input_ids"])
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return self._runner(signature(inputs))(**inputs)

    # ------------------------------------------------------------------ generation
    def _step_runner(self, kind: str) -> Callable[..., Any]:
        """The injected "prefill", "decode" or "unpadded" (scoring without padding) graph, built on first use.

        These graphs wrap the model, so its modules sit under STEP_PREFIX; they share the op modules."""
        if kind not in self._runners:
            base = cached_graph(self.model, kind, lambda: _EXPORTERS[kind](self.model))
            # The decode step's mask covers the whole preallocated cache, so positions come from position_ids.
            inputs = (None, *POSITION_INPUTS[1:]) if kind == "decode" else POSITION_INPUTS
            try:
                gm, inserted = inject(base, [s.site for s in self.plan], list(self.ops), self.plan.info.hidden_size,
                                      prefix=STEP_PREFIX, position_inputs=inputs)
            except SiteNotFound as err:
                raise ValidationError([Diagnostic("error", f"cannot place the spec in the {kind} graph: {err}",
                                                  self.plan.spec.filename, hint="name another site")]) from None
            self._graphs[kind], self._inserted[kind] = gm, inserted
            self._runners[kind] = self._maybe_compiled(gm, "scoring" if kind == "unpadded" else kind)
        return self._runners[kind]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Like `model.generate`: prompt + new token ids, decoded with a KV cache through the injected graphs."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, not {max_new_tokens}")
        if not getattr(self.model, "can_generate", lambda: False)():
            raise TypeError(f"{type(self.model).__name__} is not a causal language model; it cannot generate")
        config = getattr(self.model, "generation_config", None)
        if eos_token_id is None and config is not None:
            eos_token_id = config.eos_token_id
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
            pad_token_id = eos[0] if pad_token_id is None and eos else pad_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.captures.clear()
        sampling = Sampling(do_sample, temperature, top_k, top_p)
        return decode_loop(self._step_runner("prefill"), self._step_runner("decode"), input_ids, attention_mask,
                           max_new_tokens, sampling, eos, pad_token_id)

    # ------------------------------------------------------------------ artefacts
    def _program(self) -> torch.export.ExportedProgram:
        param = next(self.model.parameters())
        vocab = int(getattr(self.model.config.get_text_config(), "vocab_size", 2) or 2)
        program = artifact.export_program(self.graph_module, vocab, param.device)
        self.captures.clear()
        return program

    def save(self, path: str | os.PathLike) -> str:
        """Write a torch.export `.pt2` program (logits out) with the injections and their parameters inside."""
        return artifact.save(self._program(), path)

    def package(self, path: str | os.PathLike) -> str:
        """Write an AOTInductor-compiled package of the same program (needs a C++ compiler)."""
        return artifact.package(self._program(), path)

    def _unpadded(self, inputs: dict[str, torch.Tensor]) -> bool:
        """Whether this call can take the unpadded graph: only ids (and an all-ones mask), 2+ tokens.

        Checking the mask reads it back (one sync), as transformers itself does before skipping a mask."""
        if not self._causal_path or set(inputs) - {"input_ids", "attention_mask"} or inputs["input_ids"].shape[1] < 2:
            return False
        mask = inputs.get("attention_mask")
        return mask is None or bool(mask.all())

    # ------------------------------------------------------------------ inspection
    def explain(self) -> str:
        """One row a statement and site: line:col, site, module path, fx node, op."""
        self._runner(SCORING)
        nodes = {x.index: x.node for x in self._inserted[SCORING]}
        rows = [("line:col", "site", "module path", "fx node", "op")]
        for i, step in enumerate(self.plan):
            rows.append((f"{step.span.line}:{step.span.column}", step.site.label, step.site.module_path,
                         nodes.get(i, "-"), format_op(step.op)))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)

    def extra_repr(self) -> str:
        return f"model={type(self.model).__name__}, statements={len(self.plan.spec)}, sites={len(self.plan)}"
