"""Models by name: built-in tiny models made on the spot (nothing downloaded), or Hugging Face ids and folders."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=12, n_embd=128, n_head=4, n_positions=256, vocab_size=260,
                        bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return GPT2LMHeadModel(config)


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=8, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=260,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return LlamaForCausalLM(config)


BUILTIN: dict[str, Callable[[], nn.Module]] = {"tiny:gpt2": _tiny_gpt2, "tiny:llama": _tiny_llama}
DEFAULT_MODEL = "tiny:gpt2"


def load_model(name: str, seed: int = 0) -> nn.Module:
    """A model in eval mode: a built-in `tiny:*` (random weights, seeded) or a hub id / local folder."""
    if name in BUILTIN:
        torch.manual_seed(seed)
        return BUILTIN[name]().eval()
    if name.startswith("tiny:"):
        raise ValueError(f"no built-in model '{name}'; built-in models: {', '.join(BUILTIN)}")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name).eval()
