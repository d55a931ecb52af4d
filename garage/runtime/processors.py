"""The logits processors a model's generation config asks for, so that `inj.generate` chooses the tokens
`model.generate` would: BART's family forces EOS at the last position, Blenderbot blocks repeated n-grams.

Made from transformers' own processor classes, in the order `GenerationMixin._get_logits_processor` applies
them (checked on transformers 5.24); a field at its neutral value adds nothing, so most models get none.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.generation import logits_process as lp

# (generation config field, whether it is set, the processor) in transformers' order. `at` holds the prompt
# length, the last position's index + 1 (max_length) and the EOS ids.
_Make = Callable[[Any, dict[str, Any]], Any]
_PROCESSORS: tuple[tuple[str, Callable[[Any], bool], _Make], ...] = (
    ("repetition_penalty", lambda v: v not in (None, 1.0), lambda v, at: lp.RepetitionPenaltyLogitsProcessor(v)),
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


def logits_processors(config: Any, prompt_tokens: int, max_new_tokens: int, eos: list[int],
                      device: torch.device) -> lp.LogitsProcessorList | None:
    """The processors `config` (a GenerationConfig, or None) asks for; None when it asks for none."""
    if config is None:
        return None
    at = {"prompt": prompt_tokens, "max_length": prompt_tokens + max_new_tokens, "device": device,
          "eos": torch.tensor(eos, device=device) if eos else None}
    made = [make(getattr(config, name), at) for name, wanted, make in _PROCESSORS
            if wanted(getattr(config, name, None)) and (name not in _NEEDS_EOS or eos)]
    return lp.LogitsProcessorList(made) if made else None
