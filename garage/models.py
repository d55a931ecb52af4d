"""Models by name: built-in tiny models made on the spot (nothing downloaded), or Hugging Face ids and folders.

A built-in model has random weights (seeded) and a character tokenizer that needs no files: the 95
printable ASCII characters plus <unk>, <bos>, <eos> and <pad>. Its text is gibberish, but readable, and
every code path is the real one.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHARS = [chr(c) for c in range(32, 127)]
UNK, BOS, EOS, PAD = range(len(CHARS), len(CHARS) + 4)
VOCAB = 100


def char_tokenizer() -> PreTrainedTokenizerBase:
    """One token per printable ASCII character, made in memory (offline); anything else is <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(CHARS)}
    vocab.update({"<unk>": UNK, "<bos>": BOS, "<eos>": EOS, "<pad>": PAD})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", padding_side="left")


def _tiny_gpt2() -> PreTrainedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=12, n_embd=128, n_head=4, n_positions=512, vocab_size=VOCAB, initializer_range=0.3,
                        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(config)


def _tiny_llama() -> PreTrainedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=8, hidden_size=128, intermediate_size=256, num_attention_heads=4, initializer_range=0.3,
                         num_key_value_heads=2, max_position_embeddings=512, vocab_size=VOCAB,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(config)


BUILTIN: dict[str, Callable[[], PreTrainedModel]] = {"tiny:gpt2": _tiny_gpt2, "tiny:llama": _tiny_llama}
DEFAULT_MODEL = "tiny:gpt2"


def _looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id ("org/name"): it exists, or is written as a path."""
    return (os.path.exists(name) or name.startswith((".", "/", "~")) or name.endswith(("/", os.sep))
            or "\\" in name or name.count("/") > 1)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: a failed download would otherwise retry for half a minute."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname or "", endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _source(name: str) -> str:
    """Where a non-built-in model comes from: "folder", "cache" or "hub"; a ValueError says why neither
    works, at once, instead of after the hub client's retries."""
    if _looks_like_path(name):
        if not os.path.isdir(os.path.expanduser(name)):
            raise ValueError(f"no such model folder: {name}")
        return "folder"
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return "cache" if not _hub_reachable() else "hub"
    if not _hub_reachable():
        raise ValueError(f"model '{name}' is not in the local Hugging Face cache and the hub cannot be reached; "
                         f"pass a folder saved with save_pretrained, or a built-in model: {', '.join(BUILTIN)}")
    return "hub"


def load_model(name: str, seed: int = 0) -> PreTrainedModel:
    """A model in eval mode: a built-in `tiny:*` (random weights, seeded) or a hub id / local folder."""
    return load_model_and_tokenizer(name, seed)[0]


def load_model_and_tokenizer(name: str, seed: int = 0, device: str | torch.device | None = None,
                             dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a built-in name, a hub id or a local folder; the model in eval mode."""
    if name in BUILTIN:
        torch.manual_seed(seed)
        model, tokenizer = BUILTIN[name](), char_tokenizer()
    elif name.startswith("tiny:"):
        raise ValueError(f"no built-in model '{name}'; built-in models: {', '.join(BUILTIN)}")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        kwargs["local_files_only"] = _source(name) != "hub"
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=kwargs["local_files_only"])
    if device is not None or dtype is not None:
        nn.Module.to(model, device=device, dtype=dtype)  # in place; PreTrainedModel.to's wrapper is untyped
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer
