"""How the next token is chosen, the same way on every path: as `model.generate` chooses it.

A request's options are resolved like `model.generate` resolves them (its own arguments, then the model's
generation config, then transformers' defaults), and the scores go through transformers' own processor
classes in the order `GenerationMixin._get_logits_processor` applies them (checked on transformers 5.24):
the config's processors (forced EOS for the BART family, n-gram blocking for Blenderbot, …), then, when
sampling, its warpers (temperature, top-k, top-p, min-p, typical, ε, η). A token is then the argmax, or
a draw from the softmax with `torch.multinomial`, as in `GenerationMixin._sample`. So the graph path, the
hook path (which calls `model.generate` itself with the same options) and a plain `model.generate`
draw the same tokens from the same seed.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp

from .._compat import generation_defaults, repetition_penalty_skips_padding

_Make = Callable[[Any, dict[str, Any]], Any]
_Wanted = Callable[[Any], bool]
# (generation config field, whether it is set, the processor) in transformers' order. `at` holds the prompt
# length, the last position's index + 1 (max_length), the EOS ids, the device, and where each row's prompt
# starts past its left padding (where transformers passes it, the repetition penalty skips pad tokens).
_PROCESSORS: tuple[tuple[str, _Wanted, _Make], ...] = (
    ("repetition_penalty", lambda v: v not in (None, 1.0),
     lambda v, at: lp.RepetitionPenaltyLogitsProcessor(v, **at["unpadded"])),
    ("no_repeat_ngram_size", lambda v: bool(v), lambda v, at: lp.NoRepeatNGramLogitsProcessor(v)),
    ("bad_words_ids", lambda v: v is not None, lambda v, at: lp.NoBadWordsLogitsProcessor(v, at["eos"])),
    ("min_length", lambda v: bool(v), lambda v, at: lp.MinLengthLogitsProcessor(v, at["eos"], device=at["device"])),
    ("min_new_tokens", lambda v: bool(v),
     lambda v, at: lp.MinNewTokensLengthLogitsProcessor(at["prompt"], v, at["eos"], device=at["device"])),
    ("forced_bos_token_id", lambda v: v is not None, lambda v, at: lp.ForcedBOSTokenLogitsProcessor(v)),
    ("forced_eos_token_id", lambda v: v is not None,
     lambda v, at: lp.ForcedEOSTokenLogitsProcessor(at["max_length"], v, device=at["device"])),
    ("suppress_tokens", lambda v: v is not None, lambda v, at: lp.SuppressTokensLogitsProcessor(v, device=at["device"])),
    ("begin_suppress_tokens", lambda v: v is not None,
     lambda v, at: lp.SuppressTokensAtBeginLogitsProcessor(v, at["prompt"], device=at["device"])),
)
_NEEDS_EOS = {"bad_words_ids", "min_length", "min_new_tokens"}
# The warpers, applied only when sampling, in transformers' order.
_WARPERS: tuple[tuple[str, _Wanted, _Make], ...] = (
    ("temperature", lambda v: v is not None and v != 1.0, lambda v, at: lp.TemperatureLogitsWarper(v)),
    ("top_k", lambda v: v is not None and v != 0, lambda v, at: lp.TopKLogitsWarper(top_k=v)),
    ("top_p", lambda v: v is not None and v < 1.0, lambda v, at: lp.TopPLogitsWarper(top_p=v)),
    ("min_p", lambda v: v is not None, lambda v, at: lp.MinPLogitsWarper(min_p=v)),
    ("typical_p", lambda v: v is not None and v < 1.0, lambda v, at: lp.TypicalLogitsWarper(mass=v)),
    ("epsilon_cutoff", lambda v: v is not None and 0.0 < v < 1.0, lambda v, at: lp.EpsilonLogitsWarper(epsilon=v)),
    ("eta_cutoff", lambda v: v is not None and 0.0 < v < 1.0,
     lambda v, at: lp.EtaLogitsWarper(epsilon=v, device=at["device"])),
)


@functools.cache
def _config_fields() -> frozenset[str]:
    return frozenset(vars(GenerationConfig()))


@dataclass(frozen=True)
class Generation:
    """One generation request, resolved against the model's generation config as `model.generate` would."""

    max_new_tokens: int
    do_sample: bool
    eos: tuple[int, ...]
    pad_token_id: int | None
    config: Any  # a GenerationConfig (or None): the model's, with this request's options set on it
    asked: dict[str, Any]  # the options the caller gave, passed on as they are to `model.generate`
    # Run after each forward call (the prompt's, then each new token's), outside any compiled graph: where
    # `InjectedModel.generate` takes each call's captures (`runtime.recording`). The graph and hook backends call it.
    after_call: Callable[[], None] | None = None

    @classmethod
    def resolve(cls, model_config: Any, max_new_tokens: int = 20, do_sample: bool = False,
                eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                **options: Any) -> Generation:
        """`options` are generation config fields (temperature, top_k, top_p, …); None means: the model's."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, not {max_new_tokens}")
        unknown = sorted(set(options) - _config_fields())
        if unknown:
            raise TypeError(f"generate() got options that are not generation config fields: {', '.join(unknown)}")
        asked = {k: v for k, v in options.items() if v is not None}
        config = copy.deepcopy(model_config) if model_config is not None else None
        if config is not None:
            for name, value in asked.items():
                setattr(config, name, value)
        if eos_token_id is None and config is not None:
            eos_token_id = config.eos_token_id
        eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id or ())
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
            pad_token_id = eos[0] if pad_token_id is None and eos else pad_token_id
        return cls(max_new_tokens, do_sample, eos, pad_token_id, config, asked)

    def _field(self, name: str) -> Any:
        value = getattr(self.config, name, None) if self.config is not None else None
        return generation_defaults().get(name) if value is None else value

    def processors(self, attention_mask: torch.Tensor) -> lp.LogitsProcessorList:
        """The config's processors, then (when sampling) its warpers, each made only when its field is set,
        for a prompt with this (left-padded) mask."""
        prompt_tokens, device = attention_mask.shape[1], attention_mask.device
        padding = (attention_mask != 0).int().argmax(dim=1)
        at = {"prompt": prompt_tokens, "max_length": prompt_tokens + self.max_new_tokens, "device": device,
              "eos": torch.tensor(self.eos, device=device) if self.eos else None,
              "unpadded": {"prompt_ignore_length": padding} if repetition_penalty_skips_padding() else {}}
        table = _PROCESSORS + (_WARPERS if self.do_sample else ())
        return lp.LogitsProcessorList(
            make(self._field(name), at) for name, wanted, make in table
            if wanted(self._field(name)) and (name not in _NEEDS_EOS or self.eos))

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The next token of each row from processed scores: the argmax, or a draw from their softmax."""
        if not self.do_sample:
            return scores.argmax(-1)
        return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)

    def generate_kwargs(self) -> dict[str, Any]:
        """What `model.generate` takes for the same request."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "eos_token_id": list(self.eos) or None,
                "pad_token_id": self.pad_token_id, **self.asked}
