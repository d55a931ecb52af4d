"""The hook backend standing in for a graph garage cannot build: the same op modules, on the eager model.

A model torch.export cannot trace (a family whose forward needs static shapes, a cache kind the step graph
cannot hold, layers that accelerate offloads to the CPU or disk) still runs its spec: by forward hooks for
the duration of each call, so the model is left as it was. What is lost is said in a warning: no fx graph,
no torch.compile, no `.pt2`. What is kept is every number: the ops are the objects the graph would hold.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..fx.export import scoring_config
from ..plan.resolve import ConcreteSite
from .decode import Sampling
from .hooks import attach


class HookRunner:
    """Scoring and generation through hooks, attached for each call and removed after it."""

    def __init__(self, model: nn.Module, sites: Sequence[ConcreteSite], ops: Sequence[nn.Module]) -> None:
        self.model, self.sites, self.ops = model, list(sites), list(ops)

    def score(self, **inputs: torch.Tensor) -> Any:
        with attach(self.model, self.sites, self.ops), scoring_config(self.model):
            return self.model(**inputs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 sampling: Sampling, eos: list[int], pad_token_id: int | None) -> torch.Tensor:
        """`model.generate` under the hooks; it follows the model's generation config, as `generate` does."""
        options: dict[str, Any] = {"do_sample": sampling.do_sample}
        if sampling.do_sample:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        generate: Any = getattr(self.model, "generate")  # a GenerationMixin method, untyped through nn.Module
        with attach(self.model, self.sites, self.ops):
            return generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            eos_token_id=eos or None, pad_token_id=pad_token_id, **options)
