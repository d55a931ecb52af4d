"""An injected model's learned parameters in a file: gates, projections and `add learn` vectors.

Each parameter is stored under a key that names where it lives in the spec, `LINE:COL/SITE/OP/NAME`
(e.g. `1:1/h.6/blade/gate.weight`), so that a file is read back by the same statements. The file records
the spec (in canonical form) and the model type. Reading one back checks all of it: a mismatch is a
diagnostic naming the statement, and then nothing is copied.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..lang.diagnostics import Diagnostic, Span
from ..lang.formatter import format_spec
from ..plan.resolve import Plan, Step

HINT = "train this spec on this model (garage train), or use the spec the file was trained with"


def statement_key(step: Step) -> str:
    """`LINE:COL/SITE`: one statement at one site (a statement over several blocks has one a block)."""
    return f"{step.span.line}:{step.span.column}/{step.site.label}"


def entries(plan: Plan, ops: Sequence[nn.Module]) -> Iterator[tuple[str, Span, nn.Parameter]]:
    """(stable key, statement span, parameter) for every injected parameter."""
    for step, op in zip(plan, ops):
        for name, param in op.named_parameters():
            yield f"{statement_key(step)}/{step.op.keyword}/{name}", step.span, param


def save(plan: Plan, ops: Sequence[nn.Module], path: str | os.PathLike[str]) -> str:
    """Write every injected parameter (float32, on the CPU), with the spec and model type as metadata."""
    tensors = {key: p.detach().float().cpu().contiguous() for key, _, p in entries(plan, ops)}
    metadata = {"kind": "garage-params", "spec": format_spec(plan.spec), "model_type": plan.info.model_type,
                "garage_version": __version__}
    save_file(tensors, os.fspath(path), metadata=metadata)
    return os.fspath(path)


def load(plan: Plan, ops: Sequence[nn.Module], path: str | os.PathLike[str]) -> list[Diagnostic]:
    """Copy a params file's values into the ops' parameters; every mismatch as a diagnostic."""
    name, filename = os.fspath(path), plan.spec.filename
    try:
        with safe_open(name, framework="pt") as f:  # safetensors: reading runs no code
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, SafetensorError) as err:
        return [Diagnostic("error", f"cannot read params file {name}: {err}", filename,
                           hint="give a file written by inj.save_params or garage train")]
    problems = []
    if metadata.get("model_type") and metadata["model_type"] != plan.info.model_type:
        problems.append(Diagnostic("error", f"params file {name} was trained on a {metadata['model_type']} model, "
                                   f"not {plan.info.model_type}", filename, hint=HINT))
    wanted = list(entries(plan, ops))
    for key, span, param in wanted:
        if key not in tensors:
            problems.append(plan.spec.source.diagnostic(span, f"params file {name} has no value for {key}", HINT))
        elif tensors[key].shape != param.shape:
            problems.append(plan.spec.source.diagnostic(
                span, f"params file {name} holds {key} with shape {list(tensors[key].shape)}, but this statement's "
                f"is {list(param.shape)}", HINT))
    extra = sorted(set(tensors) - {key for key, _, _ in wanted})
    if extra:
        more = " …" if len(extra) > 3 else ""
        problems.append(Diagnostic("error", f"params file {name} holds values for statements this spec does not have: "
                                   f"{', '.join(extra[:3])}{more}", filename, hint=HINT))
    if not problems:
        with torch.no_grad():
            for key, _, param in wanted:
                param.copy_(tensors[key].to(param.device, param.dtype))
    return problems
