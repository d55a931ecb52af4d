"""`quick_load`, as the seed library had it: (model, tokenizer, info) from a hub id, a folder or a built-in."""

from __future__ import annotations

from typing import Any

import torch

from ..models import load_model_and_tokenizer
from ..plan.archs import ModelInfo, model_config, text_config


def _device(device: str | torch.device | None) -> torch.device | None:
    if device in (None, "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(device)


def quick_load(model_id_or_path: str, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Load a causal LM and its tokenizer, in eval mode, on `device` in `dtype`; with a dict describing it."""
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model, tokenizer = load_model_and_tokenizer(model_id_or_path, device=_device(device), dtype=torch_dtype)
    return model, tokenizer, model_info(model, model_id_or_path)


def model_info(model: torch.nn.Module, model_id: str) -> dict[str, Any]:
    """The seed's info keys, read from the model as loaded."""
    config = text_config(model)
    param = next(model.parameters())
    arch = ModelInfo.from_model(model)
    return {
        "model_id": model_id,
        "architecture": (getattr(model_config(model), "architectures", None) or [type(model).__name__])[0],
        "model_type": arch.model_type,
        "hidden_size": arch.hidden_size,
        "num_layers": arch.num_layers,
        "num_heads": getattr(config, "num_attention_heads", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "max_position": getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
        "device": str(param.device),
        "dtype": str(param.dtype).replace("torch.", ""),
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
