"""InjectedModel: the injected graph packaged to be called like the Hugging Face model it came from."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.fx import GraphModule

from .formatter import format_op
from .resolve import Plan
from .rewrite import Inserted, inject
from .trace import Signature, base_graph, materialize, signature

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
        compile: bool | dict = False,
        warnings: list | None = None,
    ) -> None:
        super().__init__()
        self.ops = nn.ModuleList(modules)
        object.__setattr__(self, "model", model)  # not a submodule: its parameters are not ours
        self.plan = plan
        self.captures = captures
        self.warnings = list(warnings or [])
        self._compile_options = ({} if compile is True else dict(compile)) if compile else None
        self._graphs: dict[Signature, GraphModule] = {}
        self._runners: dict[Signature, Callable[..., Any]] = {}
        self._inserted: dict[Signature, list[Inserted]] = {}
        self.train(model.training)
        self._runner(self._default_signature())

    # ------------------------------------------------------------------ graphs
    def _default_signature(self) -> Signature:
        return signature({"input_ids": torch.zeros(1, dtype=torch.long), "attention_mask": torch.zeros(1, dtype=torch.long)})

    def _runner(self, sig: Signature) -> Callable[..., Any]:
        if sig not in self._runners:
            base = base_graph(self.model, sig)
            gm, inserted = inject(base, [s.site for s in self.plan], list(self.ops), self.plan.info.hidden_size)
            self._graphs[sig], self._inserted[sig] = gm, inserted
            runner: Callable[..., Any] = gm
            if self._compile_options is not None:
                materialize(gm)  # dynamo does not trace a lazily generated forward
                runner = torch.compile(gm, fullgraph=True, **self._compile_options)
            self._runners[sig] = runner
        return self._runners[sig]

    @property
    def graph_module(self) -> GraphModule:
        """The injected GraphModule for input_ids + attention_mask (its `.code` is readable Python)."""
        sig = self._default_signature()
        self._runner(sig)
        return self._graphs[sig]

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
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        self.captures.clear()
        return self._runner(signature(inputs))(**inputs)

    # ------------------------------------------------------------------ inspection
    def explain(self) -> str:
        """One row a statement and site: line:col, site, module path, fx node, op."""
        sig = self._default_signature()
        self._runner(sig)
        nodes = {x.index: x.node for x in self._inserted[sig]}
        rows = [("line:col", "site", "module path", "fx node", "op")]
        for i, step in enumerate(self.plan):
            rows.append((f"{step.span.line}:{step.span.column}", step.site.label, step.site.module_path,
                         nodes.get(i, "-"), format_op(step.op)))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)

    def extra_repr(self) -> str:
        return f"model={type(self.model).__name__}, statements={len(self.plan.spec)}, sites={len(self.plan)}"
