"""The serving plan: named specs checked against the model before vLLM starts, written where its workers read them.

This half runs in the user's process and does not import vLLM. It checks each spec with garage's own front
half (parse, resolve, build) against a skeleton of the model (its config on the meta device: no weights
are read), refuses what a vLLM engine cannot run with a diagnostic at the statement, and writes a plan
folder: `plan.json` (each spec's name, text, file name, cache salt and a hash of its values) and
`bind.safetensors` (tensors the caller bound by name). Workers rebuild the ops from it with the same code,
reading the spec's vector files again, and refuse to start if their values differ from the driver's. Nothing
in it runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import _cache
from ..lang import spec as ast
from ..lang.diagnostics import Diagnostic, GarageError, ResolveError, ValidationError
from ..plan.prepare import Prepared, SpecLike, prepare

# model_type → the vLLM class that serves it. These families build their decoder layers alike in vLLM
# (vllm/model_executor/models/llama.py and its kin in mistral.py, qwen2.py, qwen3.py, mixtral.py):
# `model.layers[i]` returns (hidden, residual), with `self_attn.o_proj`, `model.embed_tokens` and `model.norm`.
FAMILIES: dict[str, tuple[str, str]] = {  # model_type → (module in vllm.model_executor.models, class)
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
}
# Where vLLM names a module otherwise than transformers does: path segment renames per family. vLLM's
# Mixtral keeps its MoE block at `block_sparse_moe` (transformers 5: `mlp`); its router is `.gate` in both,
# a linear layer whose output is the router logits that vLLM's fused experts then route by.
RENAMES: dict[str, dict[str, str]] = {"mixtral": {"mlp": "block_sparse_moe"}}
# Ops a vLLM worker runs: each maps a token's hidden state (or router logits) to a new one. Captures return
# tensors (vLLM returns tokens), blades need a second model, and module/debate ops hold Python objects a
# worker cannot be sent.
SERVED_OPS = (ast.Scale, ast.Add, ast.Learn, ast.Ablate, ast.Zero, ast.Clamp, ast.Noise, *ast.ROUTER_OPS)
SERVED_SITES = ("out", "in", "attn", "mlp", "mlp.hidden", "attn.heads", "final", "router")
PLAN_FILE, BIND_FILE = "plan.json", "bind.safetensors"
CONFIG_KEY = "garage_plan"  # the hf_config field (set through vLLM's hf_overrides) naming the plan folder
REQUEST_KEY = "garage"  # SamplingParams(extra_args={"garage": NAME}) chooses a spec
# Positions that depend on where the prompt ends: a KV block computed under them holds for requests with the
# same prompt length only (a longer prompt that starts with an earlier prompt and its reply would otherwise
# reuse blocks whose `[new]` tokens are its prompt tokens).
PROMPT_RELATIVE = ("last", "prompt", "new")


@dataclass(frozen=True)
class ServedSpec:
    name: str
    text: str
    filename: str
    salt: str  # vLLM's per-request cache_salt: prefix-cache blocks are shared only within one spec
    by_prompt: bool = False  # whether its ops depend on the prompt's length (`[last]`, `[prompt]`, `[new]`)
    values: str = ""  # a hash of every number its ops hold, as the driver built them


@dataclass(frozen=True)
class ServePlan:
    folder: Path
    specs: tuple[ServedSpec, ...]

    def index(self, name: str) -> int:
        """A spec's row in the per-token tables: 1, 2, …; 0 is the plain model."""
        return 1 + [s.name for s in self.specs].index(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def digest(self) -> str:
        """Names, texts and values of every spec: what vLLM's compile cache must be keyed by (see engine_args)."""
        return hashlib.sha256("\0".join(s.salt for s in self.specs).encode()).hexdigest()[:32]


def vllm_path(model_type: str, path: str) -> str:
    """A module path of transformers' model, as vLLM's class for the family names it."""
    renames = RENAMES.get(model_type, {})
    return ".".join(renames.get(part, part) for part in path.split("."))


def skeleton(config: Any) -> nn.Module:
    """The transformers model for a config, on the meta device: its structure, with no values."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def family_problem(config: Any, filename: str) -> Diagnostic | None:
    model_type = str(getattr(config, "model_type", "unknown"))
    if model_type in FAMILIES:
        return None
    return Diagnostic("error", f"garage serves specs in vLLM for {', '.join(sorted(FAMILIES))} models, not "
                      f"'{model_type}'", filename,
                      hint="run this model with garage.compile, or serve one of those families")


def served_problems(prepared: Prepared) -> list[Diagnostic]:
    """A diagnostic at each statement a vLLM worker cannot run, saying why."""
    found: list[Diagnostic] = []
    seen: set[int] = set()
    source = prepared.spec.source
    for step in prepared.plan:
        if step.statement in seen:
            continue
        problem = None
        if not isinstance(step.op, SERVED_OPS):
            problem = (f"vLLM cannot run '{type(step.op).__name__.lower().removesuffix('op')}' here: a served spec "
                       "changes hidden states and router logits only (scale, add, ablate, zero, clamp, noise, "
                       "bias, mask, force)",
                       "run this spec with garage.compile, or remove this statement from the served spec")
        elif step.when is not None:
            problem = ("vLLM cannot run a condition (`when …`): a served spec acts on every request that names it",
                       "serve the spec without the condition, or run it with garage.compile")
        elif step.site.kind not in SERVED_SITES:
            problem = (f"vLLM has no site {step.site.label}: it serves h.I, .in, .attn, .mlp, .mlp.hidden, "
                       ".attn.heads, .router, embed and final (its modules are not transformers' modules)",
                       "name one of those sites")
        if problem:
            seen.add(step.statement)
            found.append(source.diagnostic(step.span, *problem))
    return found


def check_spec(model: nn.Module, spec: SpecLike, bind: Mapping[str, object] | None = None) -> Prepared:
    """One spec, checked as garage checks it and then for vLLM; a GarageError carries every problem."""
    prepared = prepare(model, spec, bind, at=(torch.device("cpu"), torch.float32))
    prepared.raise_if_errors()
    refused = served_problems(prepared)
    if refused:
        raise ValidationError(refused)
    return prepared


def build_plan(config: Any, specs: Mapping[str, SpecLike], bind: Mapping[str, torch.Tensor] | None = None,
               folder: str | os.PathLike[str] | None = None) -> ServePlan:
    """Check every spec against the model of `config` and write the plan for vLLM's workers.

    Every spec's problems are raised at once, as one GarageError (file:line:col for each)."""
    bind = dict(bind or {})
    family = family_problem(config, "<model>")
    if family:
        raise ResolveError([family])
    not_tensors = [k for k, v in bind.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValidationError([Diagnostic("error", f"vLLM workers receive bound tensors only; '{not_tensors[0]}' is a "
                                          f"{type(bind[not_tensors[0]]).__name__}", "<bind>",
                                          hint="bind tensors (vectors); serve module ops with garage.compile")])
    model = skeleton(config)
    served, problems = [], []
    for name, spec in specs.items():
        if not name.isidentifier():
            problems.append(Diagnostic("error", f"a served spec's name is an identifier, not {name!r}", "<specs>",
                                       hint="name it with letters, digits and underscores"))
            continue
        try:
            served.append((name, check_spec(model, spec, bind)))
        except GarageError as err:
            problems.extend(err.diagnostics)
    if problems:
        raise ValidationError(problems)
    return write_plan(served, bind, Path(folder) if folder is not None else None)


def write_plan(specs: list[tuple[str, Prepared]], bind: Mapping[str, torch.Tensor], folder: Path | None) -> ServePlan:
    """Write the plan into `folder`, or else into garage's cache as a sealed entry named by its digest (the
    same specs and values reuse it), or, with the cache off, into a private temporary folder."""
    entries = []
    for name, prepared in specs:
        text = prepared.spec.source.text
        values = values_digest(prepared.modules)
        salt = hashlib.sha256("\0".join([name, text, values]).encode()).hexdigest()[:32]
        by_prompt = any(step.site.positions is not None and step.site.positions.kind in PROMPT_RELATIVE
                        for step in prepared.plan)
        entries.append(ServedSpec(name, text, prepared.spec.filename, f"garage-{salt}", by_prompt, values))
    plan = ServePlan(Path(), tuple(entries))
    cached = _cache.entry("vllm-plans", plan.digest) if folder is None else None
    if cached is not None:
        with _cache.locked(cached):
            if _cache.read(cached) is None:
                with _cache.writing(cached) as tmp:
                    _write_files(tmp, entries, bind)
        return replace(plan, folder=cached)
    target = folder or Path(tempfile.mkdtemp(prefix="garage-vllm-"))
    target.mkdir(parents=True, exist_ok=True)
    _write_files(target, entries, bind)
    return replace(plan, folder=target)


def _write_files(folder: Path, entries: list[ServedSpec], bind: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in bind.items()}  # clones: one tensor may be bound twice
    save_file(tensors, str(folder / BIND_FILE))
    (folder / PLAN_FILE).write_text(json.dumps({"version": 1, "specs": [e.__dict__ for e in entries]}, indent=1))


def values_digest(modules: list[nn.Module | None]) -> str:
    """A hash of every number a spec's ops hold (vectors from files or bound, strengths), so that a changed
    vector gets a new cache salt even where the spec's text is the same."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in (module.state_dict() if module is not None else {}).items():
            digest.update(name.encode() + tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_plan(folder: str | os.PathLike[str]) -> tuple[ServePlan, dict[str, torch.Tensor]]:
    """The plan a driver wrote: JSON and safetensors, so reading it runs no code. A plan in garage's cache
    must carry this user's seal; one that is damaged or not sealed is refused with a ValueError that says so."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(folder)
    cache = _cache.root()
    if cache is not None and folder.is_relative_to(cache):
        files = _cache.read(folder)  # a bad entry is deleted, with a warning
    else:
        files = {n: (folder / n).read_bytes() for n in (PLAN_FILE, BIND_FILE) if (folder / n).is_file()}
    try:
        if files is None:
            raise ValueError("not sealed by this user's garage cache")
        data = json.loads(files[PLAN_FILE])
        specs = tuple(ServedSpec(str(e["name"]), str(e["text"]), str(e["filename"]), str(e["salt"]),
                                 bool(e["by_prompt"]), str(e["values"])) for e in data["specs"])
        return ServePlan(folder, specs), load(files[BIND_FILE])
    except (ValueError, KeyError, TypeError, SafetensorError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"the garage serving plan in {folder} is damaged ({type(err).__name__}: {err}); "
                         "start the engine again with garage.vllm.LLM or garage serve, which write it anew") from None
