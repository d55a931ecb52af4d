"""The hook backend: the same op modules, run by forward hooks on the eager model for the duration of each
call, so the model is left as it was.

It is how a spec runs where the graph store says no graph can be built (a family whose forward needs
static shapes, a cache kind the step graph cannot hold, layers that accelerate offloads to the CPU or
disk), and what the graph backend hands a use to when it falls back. What is lost is said in a warning:
no fx graph, no torch.compile, no `.pt2`. What is kept is every number: the ops are the objects the graph
would hold.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..fx.export import scoring_config
from ..lang import spec as ast
from ..lang.diagnostics import Span
from ..ops import innermost
from ..plan.resolve import ConcreteSite, Plan
from .hooks import attach
from .sampling import Generation


def graph_only(plan: Plan, ops: Sequence[nn.Module]) -> tuple[Span, str, str] | None:
    """The first statement hooks cannot run, as (span, what it is, the fix): a blade from a live source, a
    patch and a condition read values that only the injected graph holds (another model's state, another
    input's run, another site's value)."""
    for step, op in zip(plan, ops):
        if getattr(innermost(op), "live", None) is not None:
            return (step.op.span, "a blade from a live source model", "use garage.compile (garage run without "
                    "--hooks), or record the source's state with garage blade extract and add the file")
        if isinstance(step.op, ast.Patch):
            return step.op.span, "`patch`", "use garage.compile and pass source= to the injected model"
        if step.when is not None:
            return step.when.condition.span, "a condition (`when …`)", "use garage.compile"
    return None


class HookBackend:
    """Scoring and generation through hooks, attached for each call and removed after it."""

    name = "hooks"

    def __init__(self, model: nn.Module, sites: Sequence[ConcreteSite], ops: Sequence[nn.Module]) -> None:
        self.model, self.sites, self.ops = model, list(sites), list(ops)

    def score(self, inputs: dict[str, torch.Tensor]) -> Any:
        with attach(self.model, self.sites, self.ops) as hooks, scoring_config(self.model):
            out = self.model(**inputs)
            hooks.check_ran()
            return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, request: Generation) -> torch.Tensor:
        """`model.generate` under the hooks: it resolves the request and chooses tokens as garage's own loop does.
        `request.after_call` runs after each of the model's forward calls, as after each step of garage's loop."""
        generate: Any = getattr(self.model, "generate")  # a GenerationMixin method, untyped through nn.Module
        with attach(self.model, self.sites, self.ops) as hooks:
            after = request.after_call
            if after is not None:
                hooks.handles.append(self.model.register_forward_hook(lambda _m, _a, _out: after()))
            out = generate(input_ids, attention_mask=attention_mask, **request.generate_kwargs())
            hooks.check_ran()
            return out
