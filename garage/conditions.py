"""Calibrating a condition (`… when SITE @ v > F`) from two prompt sets, as CAST's
`find_best_condition_point` does: at each candidate site, every prompt's condition value (the mean over its
real tokens of cos(state, v), exactly what the `when` gate computes), and the threshold and direction that
best separate the prompts that should pass from those that should not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .plan.archs import ModelInfo
from .plan.prepare import sites_named
from .plan.resolve import GATE_KINDS
from .vectors import token_states


@dataclass(frozen=True)
class Calibration:
    """The best threshold at one site: `when {site} @ v {compare} {threshold}` is right on `accuracy` of
    the prompts (both sets together)."""

    site: str
    compare: str
    threshold: float
    accuracy: float

    @property
    def clause(self) -> str:
        return f"when {self.site} @ v {self.compare} {self.threshold:.4g}"


def condition_values(model: nn.Module, tokenizer: Any, prompts: Sequence[str], sites: Sequence[str],
                     vector: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per site, [len(prompts)]: each prompt's mean over its real tokens of cos(the site's state, vector)."""
    unit = vector.float().cpu() / vector.float().norm()
    out: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    for masks, found in token_states(model, tokenizer, prompts, sites, batch_size):
        for site, h in found.items():
            real = masks[site].float()
            cos = (h @ unit) / h.norm(dim=-1).clamp_min(1e-12)
            out[site].append((cos * real).sum(-1) / real.sum(-1).clamp_min(1))
    return {site: torch.cat(values) for site, values in out.items()}


def best_threshold(passing: torch.Tensor, failing: torch.Tensor) -> tuple[str, float, float]:
    """(compare, threshold, accuracy) that best separates two sets of values: thresholds halfway between
    neighbouring values, either direction; ties go to the first found, lowest threshold first."""
    values = torch.cat([passing, failing]).sort().values
    candidates = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2, values[-1:] + 1])
    best = (">", float(candidates[0]), -1.0)
    total = len(passing) + len(failing)
    for threshold in candidates.tolist():
        above = (float((passing > threshold).sum()) + float((failing <= threshold).sum())) / total
        below = (float((passing < threshold).sum()) + float((failing >= threshold).sum())) / total
        for compare, accuracy in ((">", above), ("<", below)):
            if accuracy > best[2]:
                best = (compare, threshold, accuracy)
    return best


def calibrate(model: nn.Module, tokenizer: Any, passing: Sequence[str], failing: Sequence[str], vector: torch.Tensor,
              sites: str = "h.*") -> list[Calibration]:
    """The best threshold at each site that `sites` names (of the hidden width), best first: the prompts in
    `passing` should meet the condition, those in `failing` should not."""
    if not passing or not failing:
        raise ValueError("give prompts that should pass the condition and prompts that should not")
    found = [s for s in sites_named(ModelInfo.from_model(model), sites) if s.kind in GATE_KINDS]
    if not found:
        raise ValueError(f"{sites!r} names no site a condition can read (h.I, h.I.in, embed, h.I.attn, h.I.mlp)")
    labels = [s.label for s in found]
    yes, no = (condition_values(model, tokenizer, prompts, labels, vector) for prompts in (passing, failing))
    rows = [Calibration(label, *best_threshold(yes[label], no[label])) for label in labels]
    return sorted(rows, key=lambda r: -r.accuracy)
