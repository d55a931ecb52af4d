"""Calling a spec that patches: its source inputs, checked at call time and named as its graph takes them.

A spec with `patch from source` needs a second input every call, which is where a user can go wrong: no
source, a source of another batch size, a source without a key the model's inputs have. Each is an error
at the first patch statement, with the fix, before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..fx.export import with_masks
from ..fx.patch_source import SOURCE_INPUT, WEIGHT_INPUT
from ..lang import spec as ast
from ..lang.diagnostics import ValidationError
from ..plan.resolve import Plan

SOURCE_HINT = 'pass the source input: inj(input_ids=…, attention_mask=…, source={"input_ids": …, "attention_mask": …})'


def _error(plan: Plan, message: str, hint: str) -> ValidationError:
    first = next((step.op.span for step in plan if isinstance(step.op, ast.Patch)), None)
    return ValidationError([plan.spec.source.diagnostic(first, message, hint)])


def source_inputs(plan: Plan, patches: int, inputs: dict[str, torch.Tensor], source: Mapping[str, torch.Tensor] | None,
                  weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The graph inputs of the source run (`source_<name>`) and `patch_weight`; none for a spec without patches."""
    if not patches:
        if source is not None or weight is not None:
            raise TypeError("source= and patch_weight= are for specs that patch (`patch from source`); this one does not")
        return {}
    if source is None:
        raise _error(plan, "this spec patches from a source input, and the call gave none", SOURCE_HINT)
    ids = inputs["input_ids"]
    if not isinstance(source, Mapping):
        raise _error(plan, f"source= must map input names to tensors, like the base call's keywords, not be a "
                     f"{type(source).__name__}", SOURCE_HINT)
    unknown = sorted(n for n in set(source) - set(inputs) if not n.endswith("attention_mask"))
    missing = sorted(n for n in set(inputs) - set(source) if not n.endswith("attention_mask"))
    if "input_ids" not in source or unknown or missing or not all(isinstance(t, torch.Tensor) for t in source.values()):
        raise _error(plan, f"the source input must hold tensors under the base input's names ({', '.join(sorted(inputs))})"
                     + (f"; it lacks {', '.join(missing)}" if missing else "")
                     + (f"; it has {', '.join(unknown)}, which the base input has not" if unknown else ""), SOURCE_HINT)
    source = with_masks(dict(source))
    rows = int(source["input_ids"].shape[0])
    if rows not in (1, int(ids.shape[0])):
        raise _error(plan, f"the source input has {rows} rows and the base input {int(ids.shape[0])}: each base row "
                     "is patched from its own source row, or every row from one", "give one source row, or one per base row")
    if not all(bool(t.to(torch.bool).any(-1).all()) for n, t in source.items() if n.endswith("attention_mask")):
        raise _error(plan, "a source row has no real token (its attention mask is all zeros)", "remove that row")
    if weight is None:
        weight = torch.ones(1, patches, 1, 1, device=ids.device)
    elif weight.dim() != 4 or weight.shape[1] != patches:
        raise ValueError(f"patch_weight must be [batch or 1, {patches} patches, seq or 1, heads or 1], "
                         f"not {list(weight.shape)}")
    return {**{SOURCE_INPUT.format(name): t for name, t in source.items()}, WEIGHT_INPUT: weight}


REFUSED = {
    "generation": ("a spec that patches runs on forward calls, not in generation: the source input has no generated "
                   "tokens to patch from", "call the injected model on the whole sequence (inj(input_ids=…, source=…)), "
                   "or generate with a spec without `patch`"),
    "artifact": ("a spec that patches takes a source input, and a saved program takes input_ids and attention_mask "
                 "only", "save the spec without `patch`, or run the patching in Python"),
}


def refuse(plan: Plan, use: str) -> None:
    """A use that a patching spec cannot have (generation, a `.pt2` program): an error at its first patch."""
    if any(isinstance(step.op, ast.Patch) for step in plan):
        raise _error(plan, *REFUSED[use])
