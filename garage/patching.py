"""Activation patching sweeps: how much of a behaviour each site and token brings back.

The experiment of causal tracing: run the model on a *corrupt* input, put in the *clean* input's value at one
cell (a site at one layer, at one token or one head), and measure a metric. Each cell is normalised so that
0 is the corrupt run's metric and 1 the clean run's. `patching` computes every cell exactly; it compiles
`at SITES patch from source` once and runs many cells per forward, one cell per batch row, chosen by the
graph's `patch_weight` input (the source runs once, as one row). `method="attribution"` is attribution
patching: the gradient of the metric with respect to every cell's patch weight, at weight 0, which is
(clean − corrupt) · ∂metric/∂activation, from one forward and one backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

from .compiler import compile as compile_spec
from .lang.diagnostics import GarageError
from .models import first_token, tokenizer_of

Text = Union[str, torch.Tensor, Mapping[str, torch.Tensor]]  # a prompt, its ids, or tokenizer output
Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [rows, seq, vocab] → one value a row
POSITIONS = ("each", "last", "all")


@dataclass(frozen=True)
class PatchingResult:
    """A sweep: `table[row, column]` normalised (0 = corrupt, 1 = clean), `values` the raw metric, `rows` the
    sites (`h.0`, `h.0.attn`, …), `columns` the tokens (or heads) patched, and the two runs' metrics."""

    table: torch.Tensor
    values: torch.Tensor
    rows: list[str]
    columns: list[str]
    clean: float
    corrupt: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rows": self.rows, "columns": self.columns, "clean": self.clean,
                "corrupt": self.corrupt, "table": self.table.tolist(), "values": self.values.tolist()}

    def __str__(self) -> str:
        width, left = max(6, *(len(c) for c in self.columns)), max(len(r) for r in self.rows) + 2
        head = " " * left + " ".join(f"{c:>{width}}" for c in self.columns)
        lines = [head] + [f"{row:<{left}}" + " ".join(f"{v:>{width}.3f}" for v in values)
                          for row, values in zip(self.rows, self.table.tolist())]
        return "\n".join(lines)


def _ids(text: Text, tokenizer: Any) -> dict[str, torch.Tensor]:
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer: pass tokenizer=, or give input ids")
        return dict(tokenizer([text], return_tensors="pt"))
    inputs = {"input_ids": text} if isinstance(text, torch.Tensor) else dict(text)
    ids = inputs["input_ids"]
    inputs["input_ids"] = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"a sweep takes one clean and one corrupt prompt, not a batch of {inputs['input_ids'].shape[0]}")
    return {k: v.reshape(1, -1) for k, v in inputs.items()}


def token_id(answer: int | str, tokenizer: Any) -> int:
    """A token id, or the first token of a text (" Paris", `models.first_token`)."""
    if isinstance(answer, int):
        return answer
    if tokenizer is None:
        raise ValueError(f"the answer {answer!r} is text: pass tokenizer=, or give token ids")
    return first_token(tokenizer, answer)


def logit_difference(answer: int, wrong: int) -> Metric:
    """The default metric: logit[answer] − logit[wrong] at the last position."""
    return lambda logits: logits[:, -1, answer] - logits[:, -1, wrong]


def _labels(ids: torch.Tensor, tokenizer: Any) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def _run(inj: Any, corrupt: dict[str, torch.Tensor], clean: dict[str, torch.Tensor], weight: torch.Tensor,
         metric: Metric) -> torch.Tensor:
    rows = weight.shape[0]
    base = {k: v.expand(rows, -1) for k, v in corrupt.items()}
    return metric(inj(**base, source=clean, patch_weight=weight).logits).reshape(rows)


def patching(model: nn.Module, clean: Text, corrupt: Text, sites: str = "h.*", positions: str = "each",
             metric: Metric | None = None, answer: int | str | None = None, wrong: int | str | None = None,
             tokenizer: Any = None, method: str = "exact", batch_size: int = 32) -> PatchingResult:
    """Patch the clean run's value into the corrupt run, one cell at a time: a layers × positions table (or
    layers × heads for `sites="h.*.attn.heads"`), 0 = corrupt, 1 = clean.

    `sites` is a site pattern of the language (`h.*`, `h.*.attn`, `h.*.mlp`, `h.*.mlp.hidden`,
    `h.{0..5}.in`, `h.*.attn.heads`). `positions` is "each" (a column per token; clean and corrupt must have
    as many tokens), "last" (the last tokens only) or "all" (every token at once). A heads sweep has a column
    per head, each patched at the last tokens for "last", else at every token. `metric` maps logits to
    one value a row; by default the logit difference of `answer` and `wrong` at the last position.
    `method="attribution"` estimates every cell from one forward and one backward instead."""
    tokenizer = tokenizer or tokenizer_of(model)
    clean_in, corrupt_in = _ids(clean, tokenizer), _ids(corrupt, tokenizer)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    if method not in ("exact", "attribution"):
        raise ValueError(f"method must be 'exact' or 'attribution', not {method!r}")
    length = corrupt_in["input_ids"].shape[1]
    if positions == "each" and clean_in["input_ids"].shape[1] != length:
        raise ValueError(f"positions='each' pairs tokens one to one, but the clean prompt has "
                         f"{clean_in['input_ids'].shape[1]} tokens and the corrupt one {length}: use prompts of "
                         "equal token count, or positions='last' or 'all'")
    if metric is None:
        if answer is None or wrong is None:
            raise ValueError("give answer= and wrong= (the tokens whose logit difference is measured), or metric=")
        metric = logit_difference(token_id(answer, tokenizer), token_id(wrong, tokenizer))
    where = "[last]" if positions == "last" else ""
    try:
        inj = compile_spec(model, f"at {sites}{where} patch from source")
    except GarageError as err:
        raise ValueError(f"sites={sites!r}: {err}") from None
    heads = {step.site.head_count for step in inj.plan if step.site.kind == "attn.heads"}
    units = heads.pop() if len(heads) == 1 and all(step.site.kind == "attn.heads" for step in inj.plan) else 1
    columns = ([f"head {h}" for h in range(units)] if units > 1 else
               _labels(clean_in["input_ids"][0], tokenizer) if positions == "each" else [positions])
    cells = [(k, c) for k in range(len(inj.plan)) for c in range(len(columns))]
    with torch.no_grad():
        ends = [float(metric(model(**x).logits).reshape(-1)[0]) for x in (clean_in, corrupt_in)]
    if ends[0] == ends[1]:
        raise ValueError(f"the clean and corrupt prompts give the same metric ({ends[0]:g}): there is nothing to restore")
    seq = length if positions == "each" else 1
    if method == "attribution":
        weight = torch.zeros(1, len(inj.plan), seq, units, requires_grad=True)
        (grad,) = torch.autograd.grad(_run(inj, corrupt_in, clean_in, weight, metric).sum(), weight)
        values = grad[0].sum(-1 if units == 1 else -2) + ends[1]  # first-order estimate of each cell's metric
    else:
        flat = []
        with torch.no_grad():
            for start in range(0, len(cells), batch_size):
                chunk = cells[start:start + batch_size]
                weight = torch.zeros(len(chunk), len(inj.plan), seq, units)
                for r, (k, c) in enumerate(chunk):
                    if units > 1:
                        weight[r, k, :, c] = 1.0
                    else:
                        weight[r, k, c if positions == "each" else 0, 0] = 1.0
                flat.append(_run(inj, corrupt_in, clean_in, weight, metric))
        values = torch.cat(flat).reshape(len(inj.plan), len(columns))
    values = values.detach().float()
    table = (values - ends[1]) / (ends[0] - ends[1])
    return PatchingResult(table, values, [step.site.label for step in inj.plan], columns, ends[0], ends[1], method)
