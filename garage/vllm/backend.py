"""`VllmBackend`: garage's Backend protocol (garage/runtime/backend.py) over a vLLM engine and one served spec.

It takes what the graph and hook backends take (left-padded token ids, a `Generation` resolved as
`model.generate` resolves it) and returns what they return (prompt + new ids, padded on the right), so
code written against a backend runs on vLLM unchanged. vLLM returns tokens and log-probabilities, not
logits, so `score` is refused with the way to score.
"""

from __future__ import annotations

from typing import Any

import torch

from ..runtime.sampling import Generation
from .plan import REQUEST_KEY

# Generation config fields → SamplingParams fields, where vLLM has the same option with the same meaning.
_SAMPLING = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "repetition_penalty", "min_new_tokens": "min_tokens"}
_IGNORED = {"max_new_tokens", "do_sample", "eos_token_id", "pad_token_id"}  # carried by Generation itself


class VllmBackend:
    """Generation with one served spec (None: the plain model) through a `garage.vllm.LLM` engine."""

    name = "vllm"

    def __init__(self, llm: Any, spec: str | None = None) -> None:
        self.llm, self.spec = llm, spec

    def sampling_params(self, request: Generation) -> Any:
        from vllm import SamplingParams

        unknown = sorted(set(request.asked) - set(_SAMPLING) - _IGNORED)
        if unknown:
            raise ValueError(f"the vLLM backend cannot honour {', '.join(unknown)}; it maps "
                             f"{', '.join(sorted(_SAMPLING))} onto vLLM's SamplingParams")
        options: dict[str, Any] = {"max_tokens": request.max_new_tokens, "stop_token_ids": list(request.eos),
                                   "ignore_eos": not request.eos}
        config = request.config
        if request.do_sample:
            for field, name in _SAMPLING.items():
                value = request.asked.get(field, getattr(config, field, None))
                if value is not None:
                    options[name] = value
        else:
            options["temperature"] = 0.0
            for field in ("repetition_penalty", "min_new_tokens"):
                value = request.asked.get(field, getattr(config, field, None))
                if value is not None:
                    options[_SAMPLING[field]] = value
        if self.spec is not None:
            options["extra_args"] = {REQUEST_KEY: self.spec}
        return SamplingParams(**options)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, request: Generation) -> torch.Tensor:
        prompts = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(input_ids, attention_mask)]
        outs = self.llm.generate(prompts, self.sampling_params(request), use_tqdm=False)
        new = [list(out.outputs[0].token_ids) for out in outs]
        pad = request.pad_token_id if request.pad_token_id is not None else 0
        tail = torch.full((len(new), max((len(n) for n in new), default=0)), pad, dtype=input_ids.dtype)
        for row, tokens in enumerate(new):
            tail[row, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        return torch.cat([input_ids, tail.to(input_ids.device)], dim=1)

    def score(self, inputs: dict[str, torch.Tensor]) -> Any:
        raise ValueError("vLLM returns tokens and log-probabilities, not logits: score with "
                         "garage.compile(model, spec)(**inputs), which runs the same spec on transformers")
