"""InjectedModel: the injected graphs packaged to be called like the Hugging Face model they came from.

It holds one op module per plan step and injects the same modules into every graph it builds on demand:
a scoring graph per input signature, the unpadded scoring graph, and the generation step graph.
"""

from __future__ import annotations

import os
import warnings as python_warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import GraphModule

from ..fx.export import (
    SCORING,
    Signature,
    Static,
    TraceFailure,
    fallback_warning,
    model_device,
    signature,
    specialises,
    static_warning,
    trace_diagnostic,
    vocab_size,
)
from ..fx.fuse import splicer
from ..fx.locate import HiddenShape, SiteNotFound
from ..fx.rewrite import Rewritten, inject
from ..fx.steps import (
    GraphKey,
    cache_shapes,
    can_generate,
    graph_of,
    placement,
    unpadded_possible,
)
from ..lang.diagnostics import Diagnostic, GarageWarning, ValidationError
from ..lang.formatter import format_op
from ..ops import innermost
from ..plan.resolve import Plan
from . import artifact, params
from .compiled import compiled
from .decode import Sampling, decode_loop
from .fallback import HookRunner
from .processors import logits_processors

# Forward kwargs the scoring graph has baked in; passing them with these values is harmless.
_BAKED = {"use_cache": (False, None), "return_dict": (True, None), "output_hidden_states": (False, None),
          "output_attentions": (False, None)}


class InjectedModel(nn.Module):
    """The model with a spec compiled in. Its only parameters are the injected ops' parameters."""

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        modules: list[nn.Module],
        captures: dict[str, torch.Tensor],
        compile: bool | dict[str, Any] = False,
        warnings: list[Diagnostic] | None = None,
        graphs: dict[GraphKey, Rewritten] | None = None,
    ) -> None:
        """`graphs` holds the injected graphs the checker already built (they are not built again); every
        other graph is exported and injected on first use."""
        super().__init__()
        self.ops = nn.ModuleList(modules)
        object.__setattr__(self, "model", model)  # not a submodule: its parameters are not ours
        self.model: nn.Module
        self.plan = plan
        self.captures = captures
        self.warnings = list(warnings or [])
        self._compile_options = ({} if compile is True else dict(compile)) if compile else None
        self._graphs: dict[GraphKey, Rewritten] = dict(graphs or {})
        self._runners: dict[GraphKey, Callable[..., Any]] = {}
        self._hooks = HookRunner(model, [s.site for s in plan], modules)
        self.fallbacks: dict[str, Diagnostic] = {}  # "scoring" / "generation" → why it runs by hooks
        self._static = any(isinstance(kind, Static) for kind in self._graphs)  # a scoring graph per input shape
        self._source_models = [live.model for m in modules if (live := getattr(innermost(m), "live", None)) is not None]
        self._causal_path = all(unpadded_possible(m) for m in [model, *self._source_models])
        self.train(model.training)

    # ------------------------------------------------------------------ graphs
    def _inject(self, kind: GraphKey) -> Rewritten:
        prefix, inputs = placement(kind)
        return inject(graph_of(self.model, kind), [s.site for s in self.plan], list(self.ops),
                      self.plan.info.hidden_size, prefix, inputs, splicer(list(self.ops), kind))

    def _graph(self, kind: GraphKey) -> Rewritten:
        """The injected graph of this kind: a scoring signature, "step" (generation) or "unpadded"."""
        if kind not in self._graphs:
            label = kind if isinstance(kind, str) else ""
            try:
                self._graphs[kind] = self._inject(kind)
            except SiteNotFound as err:
                where = f"the {label} graph" if label else "the scoring graph"
                raise ValidationError([Diagnostic("error", f"cannot place the spec in {where}: {err}",
                                                  self.plan.spec.filename, hint="name another site")]) from None
            except TraceFailure as failure:
                raise ValidationError([trace_diagnostic(failure, self.plan.spec.filename, label)]) from failure.__cause__
        return self._graphs[kind]

    def _runner(self, kind: GraphKey) -> Callable[..., Any]:
        """The injected graph of this kind, under torch.compile when asked for; built on first use."""
        if kind not in self._runners:
            self._runners[kind] = self._maybe_compiled(self._graph(kind).graph_module,
                                                       "step" if kind == "step" else "scoring")
        return self._runners[kind]

    def _or_hooks(self, kind: GraphKey, use: str) -> Callable[..., Any] | None:
        """The runner of this kind, or None where the model cannot be traced for it (or, for generation, the
        spec cannot be placed in its step graph): then `use` runs by hooks, with a warning said once."""
        if use in self.fallbacks:
            return None
        try:
            if kind not in self._graphs:
                self._graphs[kind] = self._inject(kind)
        except TraceFailure as failure:
            if specialises(failure) and not isinstance(kind, (str, Static)):  # trace each shape: see forward
                self._static = True
                self._warn(static_warning(failure, self.plan.spec.filename))
                return None
            why = str(failure)
        except SiteNotFound as err:
            if use != "generation":
                return self._runner(kind)  # the spec's own problem: raised as a diagnostic
            why = f"the spec cannot be placed in its step graph: {err}"
        else:
            return self._runner(kind)
        if kind == "unpadded":  # the padded graph serves unpadded batches too
            self._causal_path = False
            return None
        self._fall_back(use, why)
        return None

    def _fall_back(self, use: str, why: str) -> None:
        if self._source_models:  # a live source's state exists only in the fused graph: hooks cannot stand in
            raise ValidationError([Diagnostic("error", f"cannot build the {use} graph that a live blade source "
                                              f"needs: {why}", self.plan.spec.filename,
                                              hint="take the blade from a file (garage blade extract)")])
        self.fallbacks[use] = fallback_warning(why, self.plan.spec.filename, use)
        self._warn(self.fallbacks[use])

    def _warn(self, warning: Diagnostic) -> None:
        """Issue a warning found at run time, unless `compile` said one of its rule already."""
        if not any(w.rule == warning.rule for w in self.warnings):
            python_warnings.warn(warning.render(), GarageWarning, stacklevel=5)
        self.warnings.append(warning)

    def _token_runner(self) -> Callable[..., Any]:
        """The step graph for one-token steps. Eager, it is the step runner itself. Under torch.compile it is
        a second copy of the injected graph (dynamo caches compiled code per code object), so that the
        prompt's shapes and the one-token shape never recompile each other."""
        if "token" not in self._runners:
            step = self._runner("step")
            if self._compile_options is None:
                self._runners["token"] = step
            else:
                copy = self._inject("step")
                self._runners["token"] = self._maybe_compiled(copy.graph_module, "token")
        return self._runners["token"]

    def _maybe_compiled(self, gm: GraphModule, kind: str) -> Callable[..., Any]:
        return gm if self._compile_options is None else compiled(gm, kind, self._compile_options)

    @property
    def graph_module(self) -> GraphModule:
        """The injected GraphModule for input_ids + attention_mask (its `.code` is readable Python)."""
        return self._graph(SCORING).graph_module

    # ------------------------------------------------------------------ calling
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
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
            unpadded = self._or_hooks("unpadded", "scoring")
            if unpadded is not None:  # else: it cannot be traced, and the padded graph serves
                return unpadded(input_ids=inputs["input_ids"])
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        graph = self._scoring_runner(signature(inputs), inputs["input_ids"].shape)
        if graph is not None:
            try:
                return graph(**inputs)
            except AssertionError as err:  # a shape the traced graph's guards exclude (DeepSeek-V4's short inputs)
                self._guard_failed("scoring", err)
        return self._hooks.score(**inputs)

    def _scoring_runner(self, sig: Signature, shape: torch.Size) -> Callable[..., Any] | None:
        """The scoring graph of this signature; of this shape, for a model whose code fixes its length (known
        from the check, or found out here); None where scoring runs by hooks."""
        if not self._static:
            graph = self._or_hooks(sig, "scoring")
            if graph is not None or not self._static:
                return graph
        return self._or_hooks(Static(sig, shape[0], shape[1]), "scoring")

    def _guard_failed(self, use: str, err: AssertionError) -> None:
        """Fall back to hooks, with a warning, if `err` is a guard of the traced graph; else re-raise it."""
        if "Guard failed" not in str(err):
            raise err
        self._fall_back(use, f"its traced graph does not hold for this input: {err}")

    def _unpadded(self, inputs: dict[str, torch.Tensor]) -> bool:
        """Whether this call can take the unpadded graph: only ids (and an all-ones mask), 2+ tokens.

        Checking the mask reads it back (one sync), as transformers itself does before skipping a mask."""
        if not self._causal_path or set(inputs) - {"input_ids", "attention_mask"} or inputs["input_ids"].shape[1] < 2:
            return False
        mask = inputs.get("attention_mask")
        return mask is None or bool(mask.all())

    # ------------------------------------------------------------------ generation
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
        """Like `model.generate`: prompt + new token ids, decoded with a KV cache through the injected graphs,
        with the logits processors of the model's generation config (forced EOS, n-gram blocking, …). Where
        the step graph cannot be built, `model.generate` runs under the hooks instead (see `fallbacks`)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, not {max_new_tokens}")
        if not can_generate(self.model):
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
        if self._or_hooks("step", "generation") is None:
            return self._hooks.generate(input_ids, attention_mask, max_new_tokens, sampling, eos, pad_token_id)
        prompt_step, token_step = self._runner("step"), self._token_runner()
        dtype = next(self.model.parameters()).dtype
        processors = logits_processors(config, input_ids.shape[1], max_new_tokens, eos, input_ids.device)
        try:
            return decode_loop(prompt_step, token_step, cache_shapes(self._graph("step").graph_module), input_ids,
                               attention_mask, max_new_tokens, sampling, eos, pad_token_id, dtype, processors)
        except AssertionError as err:
            self._guard_failed("generation", err)
        return self._hooks.generate(input_ids, attention_mask, max_new_tokens, sampling, eos, pad_token_id)

    # ------------------------------------------------------------------ artefacts
    def _program(self) -> torch.export.ExportedProgram:
        program = artifact.export_program(self.graph_module, vocab_size(self.model), model_device(self.model))
        self.captures.clear()
        return program

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write a torch.export `.pt2` program (logits out) with the injections and their parameters inside."""
        return artifact.save(self._program(), path)

    def save_params(self, path: str | os.PathLike[str]) -> str:
        """Write every injected parameter (gates, projections, `add learn` vectors) as safetensors, keyed by
        statement (`LINE:COL/SITE/OP/NAME`), with the spec and model type; `garage.compile(..., params=path)`
        reads it back."""
        return params.save(self.plan, list(self.ops), path)

    def package(self, path: str | os.PathLike[str]) -> str:
        """Write an AOTInductor-compiled package of the same program (needs a C++ compiler)."""
        return artifact.package(self._program(), path)

    # ------------------------------------------------------------------ inspection
    def explain_rows(self) -> list[dict[str, Any]]:
        """One record a statement and site: line, column, site, module path, shape, fx node, op. The fx
        nodes are those of the graph the spec was checked on (the generation step for a causal LM), or of
        the scoring graph; the shape is the site's value there."""
        graph = next(iter(self._graphs.values()), None)
        if graph is None and self._or_hooks(SCORING, "scoring") is not None:
            graph = self._graph(SCORING)
        if graph is None:  # it runs by hooks: there is no graph node, and no traced shape
            return [{"line": step.span.line, "column": step.span.column, "site": step.site.label,
                     "module_path": step.site.module_path, "shape": "-", "node": "(hook)",
                     "op": format_op(step.op)} for step in self.plan]
        nodes = {x.index: x.node for x in graph.inserted}
        values = {n.name: n.meta.get("val") for n in graph.graph_module.graph.nodes}
        sizes = HiddenShape.of(graph.graph_module.graph, self.plan.info.hidden_size)
        rows = []
        for i, step in enumerate(self.plan):
            node = nodes.get(i, "-")
            rows.append({"line": step.span.line, "column": step.span.column, "site": step.site.label,
                         "module_path": step.site.module_path,
                         "shape": sizes.describe(values.get(node), step.site.head_count), "node": node,
                         "op": format_op(step.op)})
        return rows

    def explain(self) -> str:
        """`explain_rows` as an aligned table, then a line for each live blade source, and one for each use
        (scoring, generation) that runs by hooks."""
        rows = [("line:col", "site", "module path", "shape", "fx node", "op")]
        rows += [(f"{r['line']}:{r['column']}", r["site"], r["module_path"], r["shape"], r["node"], r["op"])
                 for r in self.explain_rows()]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        hooked = [f"{use}: by forward hooks on the eager model (garage cannot build its graph: see the warning)"
                  for use in self.fallbacks]
        return "\n".join(table + self._sources() + hooked)

    def _sources(self) -> list[str]:
        """One line per live blade source: which of its blocks run in the graph."""
        lines = []
        for step, op in zip(self.plan, self.ops):
            live = getattr(innermost(op), "live", None)
            if live is not None:
                site, blocks = live.site, live.metadata.get("num_layers", "?")
                lines.append(f"{step.span.line}:{step.span.column} source {live.metadata.get('name', '')}: its "
                             f"{site.label} ({site.module_path}), so blocks 0..{site.layer} of {blocks} run in this "
                             f"graph, and not its later blocks or its head")
        return lines

    def extra_repr(self) -> str:
        return f"model={type(self.model).__name__}, statements={len(self.plan.spec)}, sites={len(self.plan)}"
