"""Tensor files named in specs, loaded without ever executing code: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAFETENSORS = (".safetensors",)
TORCH_FILES = (".pt", ".pth", ".bin")


class FileProblem(Exception):
    """A file that cannot be used; the message says why and the hint how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class LoadedTensor:
    tensor: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata, e.g. {"domain": "math"}


def resolve_path(path: str, base_dir: str | os.PathLike | None) -> Path:
    """Relative paths are read from the spec file's folder (or the working folder for spec text)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def _choose(names: list[str], key: str | None, shown: str) -> str:
    """The tensor name to read: `key` if given, else the file's only tensor."""
    if key is not None:
        if key not in names:
            raise FileProblem(f"{shown} has no tensor '{key}'", f"tensors in the file: {', '.join(sorted(names)) or 'none'}")
        return key
    if len(names) != 1:
        listed = ", ".join(sorted(names)) or "none"
        raise FileProblem(f"{shown} holds {len(names)} tensors; name one", f'write "{shown}#KEY" with KEY one of: {listed}')
    return names[0]


def load_tensor(path: str, key: str | None = None, base_dir: str | os.PathLike | None = None) -> LoadedTensor:
    """The one tensor in a file (or the one named `key`). Raises FileProblem with a fix in its hint."""
    full = resolve_path(path, base_dir)
    if not full.is_file():
        raise FileProblem(f"file not found: {path}", f"looked for {full}" + ("" if full.is_absolute() else " (relative to the spec)"))
    suffix = full.suffix.lower()
    if suffix in SAFETENSORS:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(full), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                return LoadedTensor(f.get_tensor(_choose(list(f.keys()), key, path)), metadata)
        except (SafetensorError, OSError, ValueError) as err:
            raise FileProblem(f"{path} is not a readable safetensors file ({err})", "re-save it with safetensors.torch.save_file") from None
    if suffix in TORCH_FILES:
        try:
            obj = torch.load(str(full), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise FileProblem(
                f"refused to load {path}: it holds Python objects that would run code when unpickled",
                "garage loads only plain tensors; save the tensor with safetensors.torch.save_file or torch.save(tensor)",
            ) from err
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            raise FileProblem(f"{path} is not a readable torch file ({err})", "save it with torch.save(tensor)") from None
        if isinstance(obj, torch.Tensor):
            if key is not None:
                raise FileProblem(f"{path} holds a single tensor, not a dict with '{key}'", f'write "{path}" without #{key}')
            return LoadedTensor(obj)
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            return LoadedTensor(tensors[_choose(list(tensors), key, path)])
        raise FileProblem(f"{path} holds a {type(obj).__name__}, not a tensor", "save a tensor or a dict of tensors")
    raise FileProblem(
        f"{path}: unsupported file type '{suffix or 'none'}'",
        "use a .safetensors file (or .pt/.pth/.bin saved with torch.save)",
    )
