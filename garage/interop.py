"""Steering vectors in other tools' formats: repeng's and llama.cpp's control-vector GGUF, and the steer
config of lm-eval's `steered` model. Read a control vector (`read_control_vector`, or name one in a spec:
`at h.10 add "happy.gguf#direction.10"`), write one (`write_control_vector`), or write the vectors a spec
adds (`export`, `garage export`).

**Control-vector GGUF** (repeng `ControlVector.export_gguf` / `import_gguf`, repeng/extract.py; llama.cpp
`common_control_vector_load`, common/common.cpp): `general.architecture` "controlvector", the string
`controlvector.model_hint` (the model type), `controlvector.layer_count` (the number of directions, uint32
as repeng writes it), and one 1-D F32 tensor `direction.K` a layer.

*direction.K is added to the output of block K, counting from 0: garage's `h.K`.* From the sources:
- llama.cpp: `common_control_vector_load_one` parses K from the tensor name, refuses K = 0 ("invalid (zero)
  direction tensor layer index") and stores direction.K at row K−1 ("layer 1 at [0]");
  `llama_adapter_cvec::apply` (src/llama-adapter.cpp) copies row il−1 into `tensors[il]` ("there's never a
  tensor for layer 0"); each model's graph calls `build_cvec(cur, il)` on layer il's output, `l_out`, with il
  from 0 (e.g. src/models/llama.cpp). So direction.K steers `model.layers[K]`'s output, and block 0 has no
  slot: writing `h.0` is refused here.
- repeng: `read_representations` reads directions[K] from `hidden_states[K + 1]`, the output of
  `model.model.layers[K]`, and `ControlModel` adds it to that layer's output (repeng/control.py).
llama.cpp's `cvector-generator` (tools/cvector-generator) names the vector it reads at layer il's output
direction.(il+1), so its files steer one block later than where they were read: the generator's choice,
not the format's, and not garage's.

**lm-eval's steer config** (lm_eval/models/hf_steered.py, `SteeredModel`): a `torch.save`d dict
`{hookpoint: {"steering_vector": Tensor, "steering_coefficient": float, "action": "add", "bias": None,
"head_index": None}}`. A hookpoint is a module path relative to `model.base_model` (Llama's block 10 is
"layers.10", not "model.layers.10"); a forward hook adds coefficient × vector to the module's output (its
first element when a tuple) at every position. Its CSV form derives each vector from a sparse autoencoder
(sparsify, sae_lens) and cannot hold a vector of its own, so garage writes the `.pt`, with every key that
either loader reads (older ones require "bias" and load with weights_only=True, which this dict passes).
Older releases also built each hook from a lambda over the loop's variables, so that every hookpoint added
the last entry's vector; 0.4.13 (the one tested) binds each with functools.partial. With an older one,
export one hookpoint a file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from . import ops
from .lang.diagnostics import Diagnostic, GarageError
from .lang.formatter import format_number, format_string
from .ops import innermost
from .plan.files import DIRECTION, GGUF_INSTALL, MAX_ELEMENTS
from .plan.resolve import ConcreteSite, Step
from .runtime.injected import InjectedModel

ARCH = "controlvector"
FLOAT_TYPES = ("F32", "F16", "F64")  # GGML types a direction may be read from; garage writes F32
Format = Literal["gguf", "lm-eval"]
FORMATS: tuple[Format, ...] = ("gguf", "lm-eval")
LM_EVAL_FILE = "steer.pt"  # written inside the folder `export(..., "lm-eval", folder)` is given
SKIP_HINT = "leave it out of the spec, or export the rest with --skip-unsupported (skip_unsupported=True)"
SKIPPED_HINT = "the file leaves it out, so it steers otherwise than the spec"


class UnsupportedError(GarageError):
    """Statements of a spec that the format it is exported to cannot express."""


@dataclass(frozen=True)
class ControlVector:
    """A control vector as repeng and llama.cpp store it: a direction per block, keyed by garage's block
    index (direction.K is added to block K's output, `h.K`), and the model type it was made on."""

    model_hint: str
    directions: dict[int, torch.Tensor]

    def spec(self, path: str, factor: float = 1.0) -> str:
        """Spec text adding every direction at its block, read from `path`: what llama.cpp's
        `--control-vector-scaled path factor` does."""
        scaled = "" if factor == 1 else f" * {format_number(factor)}"
        return "".join(f"at h.{k} add {format_string(f'{path}#direction.{k}')}{scaled}\n" for k in self.directions)


def _gguf() -> ModuleType:
    try:
        import gguf
    except ImportError:
        raise ValueError(f"reading and writing .gguf files needs the gguf package: {GGUF_INSTALL}") from None
    return gguf


def _string(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    return bytes(field.parts[-1]).decode("utf-8") if field is not None and field.parts else None


def read_control_vector(path: str | os.PathLike[str]) -> ControlVector:
    """A repeng or llama.cpp control vector. Refused (ValueError): another GGUF architecture, a tensor not
    named direction.K, one that is not a 1-D float tensor, or directions of different widths. Files are
    memory-mapped and parsed, never executed; each direction is copied off the map."""
    gguf, shown = _gguf(), os.fspath(path)
    try:
        reader = gguf.GGUFReader(shown)
        arch = _string(reader, "general.architecture")
        hint = _string(reader, f"{ARCH}.model_hint")
        found = list(reader.tensors)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:
        raise ValueError(f"{shown} is not a readable GGUF file ({err})") from None
    if arch not in (None, ARCH):
        raise ValueError(f"{shown} is a GGUF file of a {arch!r} model, not a control vector ({ARCH!r})")
    directions: dict[int, torch.Tensor] = {}
    for tensor in found:
        name, kind = tensor.name, tensor.tensor_type.name
        match = DIRECTION.fullmatch(name)
        if match is None:
            raise ValueError(f"{shown}: tensor '{name}' is not a direction (named direction.K, K a block index)")
        if kind not in FLOAT_TYPES or len(tensor.shape) != 1 or int(tensor.n_elements) > MAX_ELEMENTS:
            raise ValueError(f"{shown}: {name} is a {kind} tensor of shape {list(reversed(tensor.shape.tolist()))}, "
                             "not one vector of floats")
        layer, data = int(match.group(1)), torch.from_numpy(tensor.data.copy())
        directions[layer] = directions[layer] + data if layer in directions else data  # "direction.05": llama.cpp sums
    widths = {len(v) for v in directions.values()}
    if len(widths) > 1:
        raise ValueError(f"{shown}: its directions have different widths ({', '.join(map(str, sorted(widths)))})")
    return ControlVector(hint or "", dict(sorted(directions.items())))


def write_control_vector(path: str | os.PathLike[str], directions: Mapping[int, torch.Tensor],
                         model_hint: str) -> str:
    """Write `directions` ({block K: [hidden] vector}) as a control vector that repeng and llama.cpp read:
    direction.K as F32, added to block K's output. K must be 1 or more: llama.cpp has no slot for block 0
    and refuses a file holding direction.0. Returns the path."""
    gguf = _gguf()
    if not directions:
        raise ValueError("a control vector needs at least one direction")
    arrays = {}
    for layer in sorted(directions):
        vector = directions[layer]
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"direction {layer!r}: a block index of 1 or more is needed; llama.cpp has no control "
                             "vector slot for block 0 and refuses direction.0")
        if vector.dim() != 1 or not vector.is_floating_point():
            raise ValueError(f"direction {layer} is a {vector.dtype} tensor of shape {list(vector.shape)}, not one "
                             "[hidden] vector of floats")
        arrays[layer] = vector.detach().to("cpu", torch.float32).contiguous().numpy()
    widths = {a.shape[0] for a in arrays.values()}
    if len(widths) > 1:
        raise ValueError(f"the directions have different widths ({', '.join(map(str, sorted(widths)))})")
    writer = gguf.GGUFWriter(os.fspath(path), ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(arrays))
    for layer, array in arrays.items():
        writer.add_tensor(f"direction.{layer}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


# ------------------------------------------------------------------ a spec's vectors
@dataclass(frozen=True)
class Exported:
    """One vector written: its name in the file, the garage site it steers, the vector and coefficient
    (the file adds coefficient × vector), and the statements (line:col) whose adds it sums."""

    name: str
    site: str
    vector: torch.Tensor
    coefficient: float
    statements: tuple[str, ...]

    @property
    def norm(self) -> float:
        """The norm of what it adds."""
        return float((self.vector.detach().float() * self.coefficient).norm())


@dataclass(frozen=True)
class Export:
    """What `export` wrote, and the statements it left out (warnings, with skip_unsupported)."""

    path: str
    format: Format
    model_type: str
    vectors: tuple[Exported, ...]
    skipped: tuple[Diagnostic, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "format": self.format, "model_type": self.model_type,
                "vectors": [{"name": v.name, "site": v.site, "coefficient": v.coefficient, "norm": v.norm,
                             "statements": list(v.statements)} for v in self.vectors],
                "skipped": [d.as_dict() for d in self.skipped]}


Adds = list[tuple[Step, ops.Add]]


def _gguf_site(site: ConcreteSite) -> str | None:
    """Why a control vector cannot add at this site, or None when it can."""
    if site.positions is not None:
        return f"{site.label}: a control vector adds at every position"
    if site.kind != "out":
        return f"{site.label} is not a block's output, the only place a control vector adds at"
    if site.layer == 0:
        return "h.0: llama.cpp has no control vector slot for block 0 (it refuses direction.0)"
    return None


def base_prefix(model: nn.Module) -> str | None:
    """The path of `model.base_model` in the model ("" when it is the model), where lm-eval looks for
    hookpoints."""
    base = getattr(model, "base_model", model)
    return next((name for name, module in model.named_modules() if module is base), None)


def hookpoint(model: nn.Module, module_path: str) -> str | None:
    """lm-eval's name for the module at `module_path`: its path in `model.base_model`, or None outside it."""
    prefix = base_prefix(model)
    if prefix is None:
        return None
    if not prefix:
        return module_path or None
    return module_path[len(prefix) + 1:] if module_path.startswith(prefix + ".") else None


def _lm_eval_site(model: nn.Module) -> Callable[[ConcreteSite], str | None]:
    def reason(site: ConcreteSite) -> str | None:
        if site.positions is not None:
            return f"{site.label}: lm-eval's steered model adds at every position"
        if site.is_input or site.kind == "router":
            return f"{site.label} is not a module's output, the only thing lm-eval's hooks change"
        if hookpoint(model, site.module_path) is None:
            return f"{site.label} ({site.module_path}) is outside model.base_model, where lm-eval finds hookpoints"
        return None
    return reason


def spec_adds(injected: InjectedModel, unsupported: Callable[[ConcreteSite], str | None], target: str,
              skip_unsupported: bool = False) -> tuple[dict[tuple[str, str], Adds], list[Diagnostic]]:
    """The compiled spec's `add`s that `target` can hold, grouped by site, and a diagnostic for each
    statement it cannot (one per statement and reason). Captures, which change nothing, are left out.
    Unless `skip_unsupported`, any such statement raises UnsupportedError, listing them all."""
    plan = injected.plan
    groups: dict[tuple[str, str], Adds] = {}
    problems: dict[tuple[int, str], Diagnostic] = {}
    severity: Literal["error", "warning"] = "warning" if skip_unsupported else "error"
    for step, module in zip(plan, injected.ops):
        op = innermost(module)
        if getattr(op, "observes_only", False):
            continue
        if not isinstance(op, ops.Add):
            reason: str | None = f"`{step.op.keyword}` cannot be written to {target}: only `add` can"
        else:
            reason = unsupported(step.site)
            if reason is None:
                groups.setdefault(step.site.key, []).append((step, op))
                continue
        if reason is not None:
            problems.setdefault((step.statement, reason), plan.spec.source.diagnostic(
                step.span, reason, SKIPPED_HINT if skip_unsupported else SKIP_HINT, severity,
                "export-skipped" if skip_unsupported else None))
    if problems and not skip_unsupported:
        raise UnsupportedError(list(problems.values()))
    if not groups:
        raise ValueError(f"nothing to export: the spec has no `add` that {target} can hold")
    return groups, list(problems.values())


def _where(adds: Adds) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f"{step.span.line}:{step.span.column}" for step, _ in adds))


def _total(adds: Adds) -> torch.Tensor:
    """Σ F·v over the adds at one site, as float32 on the CPU: what they add together."""
    return torch.stack([(op.factor * op.vector).detach().float().cpu() for _, op in adds]).sum(0)


def _summed(adds: Adds) -> tuple[torch.Tensor, float]:
    """(vector, coefficient): one add's own v and F, or Σ F·v with coefficient 1 for several at a site."""
    if len(adds) == 1:
        op = adds[0][1]
        return op.vector.detach().cpu().clone(), float(op.factor)
    return _total(adds).to(adds[0][1].vector.dtype), 1.0


def export_gguf(injected: InjectedModel, path: str | os.PathLike[str], skip_unsupported: bool = False) -> Export:
    """Write the spec's `add`s at block outputs as a control vector: direction.K = Σ F·v over the adds at
    h.K, so that llama.cpp and repeng steer as the spec does."""
    groups, skipped = spec_adds(injected, _gguf_site, "a control vector", skip_unsupported)
    ordered = sorted(groups.values(), key=lambda adds: adds[0][0].site.layer or 0)
    layers = [int(adds[0][0].site.layer or 0) for adds in ordered]  # block outputs h.K, K ≥ 1
    vectors = [Exported(f"direction.{k}", f"h.{k}", _total(adds), 1.0, _where(adds))
               for k, adds in zip(layers, ordered)]
    model_type = injected.plan.info.model_type
    write_control_vector(path, {k: v.vector for k, v in zip(layers, vectors)}, model_type)
    return Export(os.fspath(path), "gguf", model_type, tuple(vectors), tuple(skipped))


def export_lm_eval(injected: InjectedModel, output: str | os.PathLike[str], skip_unsupported: bool = False) -> Export:
    """Write the spec's `add`s at module outputs as lm-eval's steer config: `output` itself when it ends in
    .pt or .pth, else `output`/steer.pt (the folder is made). Hookpoints are module paths in
    `model.base_model`; use it as `lm_eval --model steered --model_args pretrained=…,steer_path=FILE`."""
    model = injected.model
    groups, skipped = spec_adds(injected, _lm_eval_site(model), "lm-eval's steer config", skip_unsupported)
    target = Path(output)
    if target.suffix not in (".pt", ".pth"):
        target.mkdir(parents=True, exist_ok=True)
        target = target / LM_EVAL_FILE
    vectors, config = [], {}
    for adds in groups.values():
        site = adds[0][0].site
        name = hookpoint(model, site.module_path) or site.module_path
        vector, coefficient = _summed(adds)
        vectors.append(Exported(name, site.label, vector, coefficient, _where(adds)))
        config[name] = {"steering_vector": vector.contiguous(), "steering_coefficient": coefficient,
                        "action": "add", "bias": None, "head_index": None}
    torch.save(config, target)
    return Export(os.fspath(target), "lm-eval", injected.plan.info.model_type, tuple(vectors), tuple(skipped))


def export(injected: InjectedModel, to: str, output: str | os.PathLike[str], skip_unsupported: bool = False) -> Export:
    """Write the vectors the compiled spec adds in format `to` ("gguf" or "lm-eval"); see `export_gguf` and
    `export_lm_eval`."""
    if to == "gguf":
        return export_gguf(injected, output, skip_unsupported)
    if to == "lm-eval":
        return export_lm_eval(injected, output, skip_unsupported)
    raise ValueError(f"unknown format {to!r}: choose one of {', '.join(FORMATS)}")


__all__ = ["ControlVector", "Export", "Exported", "FORMATS", "UnsupportedError", "export", "export_gguf",
           "export_lm_eval", "hookpoint", "read_control_vector", "spec_adds", "write_control_vector"]
