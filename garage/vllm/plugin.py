"""garage's vLLM plugin (entry point group `vllm.general_plugins`), loaded by vLLM in each of its processes.

It registers one model class per served family (`Garage<vLLM class>`, chosen by `hf_overrides` that
`garage.vllm.LLM` and `garage serve` set), and wraps the engine's input processor so that a request that
chooses a spec gets that spec's cache salt (prefix-cache blocks are never shared across specs, or with the
plain model) and a request naming a spec the engine does not serve is refused with the names it does.
An engine started without a garage plan is untouched. Registering twice is harmless: vLLM may load plugins
more than once.
"""

from __future__ import annotations

import functools
from typing import Any

from .plan import CONFIG_KEY, FAMILIES, REQUEST_KEY, read_plan


def register() -> None:
    from vllm import ModelRegistry

    for _, class_name in FAMILIES.values():
        name = "Garage" + class_name
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"garage.vllm.models:{name}")
    _patch_input_processor()


@functools.cache
def _salts(folder: str) -> dict[str, tuple[str, bool]]:
    """The served specs' names → (cache salt, whether it depends on the prompt's length), read once per plan
    folder (a plan never changes once written: a new one is a new folder)."""
    plan, _ = read_plan(folder)
    return {s.name: (s.salt, s.by_prompt) for s in plan.specs}


@functools.cache
def _refusal_type() -> type[ValueError]:
    """A ValueError that vLLM's server answers with HTTP 400 (its client-error type) where vLLM is there."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return ValueError

    class SpecRefused(VLLMValidationError, ValueError):
        pass

    return SpecRefused


def chosen_spec(params: Any) -> str | None:
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(REQUEST_KEY) if isinstance(extra, dict) else None


def salted(request: Any, folder: str | None) -> Any:
    """The request with its spec's cache salt, or a ValueError (HTTP 400 from vLLM's server) naming the specs."""
    name = chosen_spec(request.sampling_params)
    if name is None:
        return request
    if folder is None:
        raise _refusal_type()(f"this engine serves no garage specs, but the request asks for {name!r}: start it with "
                         "garage.vllm.LLM(model, specs={...}) or `garage serve --spec NAME=FILE`")
    salts = _salts(folder)
    if not isinstance(name, str) or name not in salts:
        raise _refusal_type()(f"unknown garage spec {name!r}: this engine serves {', '.join(sorted(salts))} "
                         f"(choose one with extra_args={{\"{REQUEST_KEY}\": NAME}}, or leave it out for the plain model)")
    salt, by_prompt = salts[name]
    if by_prompt:  # `[last]`, `[prompt]`, `[new]`: a block's values depend on where the prompt ends
        salt += f"/prompt{_prompt_length(request)}"
    request.cache_salt = salt + (f":{request.cache_salt}" if request.cache_salt else "")
    return request


def _prompt_length(request: Any) -> int:
    ids = getattr(request, "prompt_token_ids", None)
    if ids is not None:
        return len(ids)
    embeds = getattr(request, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0


def _patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "garage", False):
        return

    @functools.wraps(original)
    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = original(self, *args, **kwargs)
        return salted(request, getattr(self.vllm_config.model_config.hf_config, CONFIG_KEY, None))

    process_inputs.garage = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs
