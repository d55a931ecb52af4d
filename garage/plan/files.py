"""Tensor files named in specs, loaded without ever executing code: safetensors, torch.load(weights_only=True),
or GGUF (a control vector of repeng or llama.cpp, read by the gguf package's memory-mapped reader).

Reads are bounded: only regular files are opened, shapes are read from the file's header (safetensors,
GGUF) or its memory-mapped storage (torch's zip format) before any data is, and a tensor larger than
MAX_ELEMENTS is refused before it is allocated.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import zipfile
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch

SAFETENSORS = (".safetensors",)
TORCH_FILES = (".pt", ".pth", ".bin")
GGUF_FILES = (".gguf",)
GGUF_INSTALL = "pip install gguf"
DIRECTION = re.compile(r"direction\.(\d+)")  # a control vector's tensor for block K (see garage/interop.py)
MAX_ELEMENTS = 1 << 28  # 256 M values (1 GiB of float32): far more than any vector or blade needs
MAX_LISTED = 20  # tensor names listed in a hint


class FileProblem(Exception):
    """A file that cannot be used; the message says why and the hint how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class LoadedTensor:
    tensor: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata, e.g. {"domain": "math"}


def resolve_path(path: str, base_dir: str | os.PathLike[str] | None) -> Path:
    """Relative paths are read from the spec file's folder (or the working folder for spec text)."""
    try:
        p = Path(path).expanduser()
    except RuntimeError as err:  # "~nosuchuser/…"
        raise FileProblem(f"cannot expand {path}: {err}", "write the full path") from None
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def listing(names: list[str]) -> str:
    """At most MAX_LISTED names, then how many more."""
    shown = ", ".join(sorted(names)[:MAX_LISTED]) or "none"
    return shown + (f", … ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def _choose(names: list[str], key: str | None, shown: str) -> str:
    """The tensor name to read: `key` if given, else the file's only tensor."""
    if key is not None:
        if key not in names:
            raise FileProblem(f"{shown} has no tensor '{key}'", f"tensors in the file: {listing(names)}")
        return key
    if len(names) != 1:
        raise FileProblem(f"{shown} holds {len(names)} tensors; name one", f'write "{shown}#KEY" with KEY one of: {listing(names)}')
    return names[0]


def _check_size(shape: list[int] | torch.Size, shown: str) -> None:
    if prod(shape) > MAX_ELEMENTS:
        raise FileProblem(f"{shown} holds a tensor of shape {list(shape)}, too large for a vector or blade",
                          f"garage reads tensors of at most {MAX_ELEMENTS:,} values")


def _regular_file(full: Path, path: str) -> None:
    try:
        mode = full.stat().st_mode
    except FileNotFoundError:
        raise FileProblem(f"file not found: {path}",
                          f"looked for {full}" + ("" if full.is_absolute() else " (relative to the spec)")) from None
    except OSError as err:
        raise FileProblem(f"cannot read {path}: {err.strerror or err}", "check the path and its permissions") from None
    if not stat.S_ISREG(mode):
        raise FileProblem(f"{path} is not a regular file", "name a tensor file, not a folder, pipe or device")


def _safetensors(full: Path, path: str, key: str | None) -> LoadedTensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(full), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            name = _choose(list(f.keys()), key, path)
            _check_size(f.get_slice(name).get_shape(), path)
            return LoadedTensor(f.get_tensor(name), metadata)
    except (SafetensorError, OSError, ValueError) as err:
        raise FileProblem(f"{path} is not a readable safetensors file ({err})", "re-save it with safetensors.torch.save_file") from None


def _torch_file(full: Path, path: str, key: str | None) -> LoadedTensor:
    zipped = zipfile.is_zipfile(full)
    if zipped:
        with zipfile.ZipFile(full) as archive:
            if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
                raise FileProblem(f"refused to load {path}: its data is compressed, which torch.save never does",
                                  "save the tensor again with torch.save, or with safetensors.torch.save_file")
    try:  # memory-mapped: a tensor's data is read only when it is used, after its shape was checked
        obj = torch.load(str(full), map_location="cpu", weights_only=True, mmap=zipped)
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
        tensor = obj
    elif isinstance(obj, dict):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        tensor = tensors[_choose(list(tensors), key, path)]
    else:
        raise FileProblem(f"{path} holds a {type(obj).__name__}, not a tensor", "save a tensor or a dict of tensors")
    _check_size(tensor.shape, path)
    return LoadedTensor(tensor.clone())  # off the memory map, so the file is not held open


def _gguf(full: Path, path: str, key: str | None) -> LoadedTensor:
    """A float tensor of a GGUF file. A control vector's `direction.K` records layer K and the file's model
    hint as the metadata the checker compares with where the vector is added."""
    try:
        import gguf
    except ImportError:
        raise FileProblem(f"reading {path} needs the gguf package", GGUF_INSTALL) from None
    floats = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64}
    try:  # the reader maps the file and parses only its header; a tensor's data is read when copied below
        reader = gguf.GGUFReader(str(full))
        tensors = {t.name: t for t in reader.tensors}
        name = _choose(list(tensors), key, path)
        found = tensors[name]
        _check_size([int(n) for n in reversed(found.shape)], path)
        if found.tensor_type not in floats:
            raise FileProblem(f"{path}: tensor '{name}' is stored as {found.tensor_type.name}, not as floats",
                              "garage reads F32, F16 and F64 tensors from .gguf files")
        tensor = torch.from_numpy(found.data.copy())  # off the memory map, so the file is not held open
        field = reader.get_field("controlvector.model_hint")
        hint = bytes(field.parts[-1]).decode("utf-8") if field is not None and field.parts else ""
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError) as err:
        raise FileProblem(f"{path} is not a readable GGUF file ({err})", "write it with gguf.GGUFWriter") from None
    direction = DIRECTION.fullmatch(name)
    if direction is None:
        return LoadedTensor(tensor)
    layer = str(int(direction.group(1)))
    return LoadedTensor(tensor, {"layer": layer, "site": f"h.{layer}", **({"model_type": hint} if hint else {})})


def load_tensor(path: str, key: str | None = None, base_dir: str | os.PathLike[str] | None = None) -> LoadedTensor:
    """The one tensor in a file (or the one named `key`). Raises FileProblem with a fix in its hint."""
    full = resolve_path(path, base_dir)
    _regular_file(full, path)
    suffix = full.suffix.lower()
    if suffix in SAFETENSORS:
        return _safetensors(full, path, key)
    if suffix in TORCH_FILES:
        return _torch_file(full, path, key)
    if suffix in GGUF_FILES:
        return _gguf(full, path, key)
    raise FileProblem(
        f"{path}: unsupported file type '{suffix or 'none'}'",
        "use a .safetensors file (or .pt/.pth/.bin saved with torch.save, or a .gguf control vector)",
    )
