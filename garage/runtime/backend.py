"""The Backend protocol: one way of running a compiled spec.

A backend takes the plan's op modules and runs them on the model, for scoring (one forward over whole
sequences) and for generation. `GraphBackend` runs them in injected fx graphs (`graph_backend.py`),
`HookBackend` through forward hooks on the eager model (`hook_backend.py`); a serving engine is a third.
The op objects, the plan and `InjectedModel` above it never know which one runs.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .sampling import Generation


class Backend(Protocol):
    """Scoring and generation with a spec's ops in place."""

    name: str  # "graph", "hooks", …

    def score(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The model's own output (ModelOutput with .logits, …) for these inputs, ops applied."""
        ...

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, request: Generation) -> torch.Tensor:
        """Prompt + new token ids, like `model.generate`, ops applied at every step."""
        ...
