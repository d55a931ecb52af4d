"""InjectedModel: a compiled spec, called and generated like the Hugging Face model it came from.

It owns the op modules (its only parameters) and turns calls into requests for its backend
(`graph_backend.py`: injected fx graphs, with hooks standing in per use where the graph store says so).
What it can be asked besides (`explain`, `.pt2` artefacts, learned parameters) lives in modules of its own.
"""

from __future__ import annotations

import dataclasses
import os
import warnings as python_warnings
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from ..fx.export import is_encoder_decoder, model_device, vocab_size
from ..fx.kinds import GraphKind, scoring_kind
from ..fx.rewrite import Rewritten
from ..fx.steps import can_generate
from ..lang.diagnostics import Diagnostic, GarageWarning
from ..plan.resolve import Plan
from . import artifact, explain, params, patching
from .compiled import CompileSetting, compile_options
from .graph_backend import GraphBackend
from .recording import recording
from .sampling import Generation

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
        compile: CompileSetting = False,
        warnings: list[Diagnostic] | None = None,
        graphs: dict[GraphKind, Rewritten] | None = None,
    ) -> None:
        """`graphs` holds the injected graphs the checker already built (they are not built again); every
        other graph is built on first use."""
        super().__init__()
        self.ops = nn.ModuleList(modules)
        object.__setattr__(self, "model", model)  # not a submodule: its parameters are not ours
        self.model: nn.Module
        self.plan = plan
        self.captures = captures
        self.warnings = list(warnings or [])
        self.backend = GraphBackend(model, plan, list(modules), compile_options(compile), self._warn,
                                    dict(graphs or {}))
        self.train(model.training)

    def _warn(self, warning: Diagnostic) -> None:
        """Issue a warning found at run time, unless `compile` said one of its rule already; keep it once."""
        if warning in self.warnings:  # a graph per shape: each new shape's route says the same again
            return
        if not any(w.rule == warning.rule for w in self.warnings):
            python_warnings.warn(warning.render(), GarageWarning, stacklevel=6)
        self.warnings.append(warning)

    @property
    def fallbacks(self) -> dict[str, Diagnostic]:
        """The uses ("scoring", "generation") that run by forward hooks, and the warning that says why."""
        return self.backend.fallbacks

    @property
    def graph_module(self) -> GraphModule:
        """The injected GraphModule for input_ids + attention_mask (its `.code` is readable Python)."""
        return self.backend.graph(scoring_kind(self.model)).graph_module

    # ------------------------------------------------------------------ calling
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                source: dict[str, torch.Tensor] | None = None, patch_weight: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """Like the model's forward. A spec that patches (`patch from source`) also takes `source`, the
        second input its patches read (`{"input_ids": …, "attention_mask": …}`: one row for every base
        row, or one row for all), and optionally `patch_weight`, [batch or 1, patches, seq or 1, heads or
        1]: each patch's weight per row and token (and head), 1 when not given (see `garage.analyze.patching`)."""
        inputs: dict[str, torch.Tensor] = {}
        for name, value in {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}.items():
            if isinstance(value, torch.Tensor):
                inputs[name] = value
            elif name in _BAKED and value in _BAKED[name]:
                continue
            elif value is not None:
                raise TypeError(f"InjectedModel does not take {name}={value!r}: the scoring graph has it baked in")
        if not {"input_ids", "input_features"} & set(inputs):
            raise TypeError("InjectedModel needs input_ids")
        if is_encoder_decoder(self.model) and not {"decoder_input_ids", "labels"} & set(inputs):
            raise TypeError("an encoder–decoder model scores target tokens given a source: pass decoder_input_ids "
                            "(the target, starting with the model's decoder_start_token_id), or call generate")
        inputs.update(patching.source_inputs(self.plan, self.backend.patches, inputs, source, patch_weight))
        self.captures.clear()
        return self.backend.score(inputs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Like `model.generate`: prompt + new token ids, decoded with a KV cache through the injected graphs.
        Options left as None come from the model's generation config, then transformers' defaults (top-k
        50 when sampling), and tokens are chosen as `model.generate` chooses them, with the config's logits
        processors (forced EOS, n-gram blocking, …); `options` are more generation config fields (min_p,
        repetition_penalty, …). Where the step graph cannot be built, `model.generate` runs under hooks
        instead (see `fallbacks`). Captures keep every step's values, joined along the sequence (see
        `capture` in docs/language.md).

        An encoder–decoder model returns the target ids, as its `generate` does (decoder start token, then
        the new tokens); a speech model takes `input_features=` in place of ids. Its encoder's captures hold
        the one encoder pass; its decoder's are joined over the steps like a decoder-only model's."""
        if not can_generate(self.model):
            raise TypeError(f"{type(self.model).__name__} is not a causal language model; it cannot generate")
        patching.refuse(self.plan, "generation")
        features = options.pop("input_features", None)
        input_ids = input_ids if input_ids is not None else features
        if input_ids is None:
            raise TypeError("generate needs input_ids (or input_features, for a speech model)")
        request = Generation.resolve(getattr(self.model, "generation_config", None), max_new_tokens, do_sample,
                                     eos_token_id, pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p,
                                     **options)
        self.captures.clear()
        mask = attention_mask if attention_mask is not None or features is not None else torch.ones_like(input_ids)
        seq2seq = is_encoder_decoder(self.model)
        once = [op for step, op in zip(self.plan, self.ops) if step.site.stack == "encoder"]  # the encoder runs once
        prompt = 1 if seq2seq else int(input_ids.shape[1])  # a decoder's prompt: its start token
        with recording(self.captures, [op for op in self.ops if op not in once], prompt) as record:
            return self.backend.generate(input_ids, mask, dataclasses.replace(request, after_call=record.called))

    # ------------------------------------------------------------------ artefacts and parameters
    def save(self, path: str | os.PathLike[str]) -> str:
        """Write a torch.export `.pt2` program (logits out) with the injections and their parameters inside."""
        return artifact.save(self._program(), path)

    def package(self, path: str | os.PathLike[str]) -> str:
        """Write an AOTInductor-compiled package of the same program (needs a C++ compiler)."""
        return artifact.package(self._program(), path)

    def _program(self) -> torch.export.ExportedProgram:
        patching.refuse(self.plan, "artifact")
        program = artifact.export_program(self.graph_module, vocab_size(self.model), model_device(self.model))
        self.captures.clear()
        return program

    def save_params(self, path: str | os.PathLike[str]) -> str:
        """Write every injected parameter (gates, projections, `add learn` vectors) as safetensors, keyed by
        statement (`LINE:COL/SITE/OP/NAME`), with the spec and model type; `garage.compile(..., params=path)`
        reads it back."""
        return params.save(self.plan, list(self.ops), path)

    # ------------------------------------------------------------------ inspection
    def explain_rows(self) -> list[dict[str, Any]]:
        """One record a statement and site: line, column, site, module path, shape, fx node, op. The fx
        nodes are those of the graph the spec was checked on (the generation step for a causal LM), or of
        the scoring graph; the shape is the site's value there."""
        return explain.rows(self.plan, self.backend.explained())

    def explain(self) -> str:
        """`explain_rows` as an aligned table, then a line for each live blade source, and one for each use
        (scoring, generation) that runs by hooks."""
        return explain.table(self.explain_rows(), explain.sources(self.plan, list(self.ops)), self.fallbacks)

    def extra_repr(self) -> str:
        return f"model={type(self.model).__name__}, statements={len(self.plan.spec)}, sites={len(self.plan)}"
