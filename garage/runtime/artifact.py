"""Saved artefacts: an injected model as a torch.export program that runs without garage.

`save` writes a `.pt2` program whose inputs are `input_ids` and `attention_mask` and whose output is the
logits tensor, so plain torch can run it (`torch.export.load(path).module()(input_ids=…, attention_mask=…)`)
without transformers' output classes. The injected ops and their parameters are inside the program.
`package` compiles it ahead of time with AOTInductor, where the machine has a C++ compiler.

`load_artifact` reads shared files, so it runs no pickle: a `.pt2` whose entries would need it (torch's
loader unpickles such entries with `weights_only=False`) is refused with an error naming the file and the
entries, before torch reads it. An AOTInductor package is compiled machine code: loading one runs it, so
it loads only when the caller says `native=True`.
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any, Callable

import torch
from torch import nn

from .._compat import aoti_compile_and_package, aoti_load_package, pt2_pickled_entries
from ..fx.export import EXAMPLE_BATCH, EXAMPLE_SEQ
from ..lang.diagnostics import Diagnostic, ValidationError


class LogitsOnly(nn.Module):
    """The injected graph with a plain tensor output."""

    def __init__(self, graph_module: nn.Module) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.graph_module(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out[0]


def export_program(graph_module: nn.Module, vocab: int, device: torch.device) -> torch.export.ExportedProgram:
    ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), device=device)
    mask = torch.ones_like(ids)
    dims = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    with torch.no_grad():
        return torch.export.export(LogitsOnly(graph_module), (), {"input_ids": ids, "attention_mask": mask},
                                   dynamic_shapes={"input_ids": dims, "attention_mask": dims}, strict=False)


def save(program: torch.export.ExportedProgram, path: str | os.PathLike[str]) -> str:
    torch.export.save(program, os.fspath(path))
    return os.fspath(path)


def package(program: torch.export.ExportedProgram, path: str | os.PathLike[str]) -> str:
    """An AOTInductor-compiled package of the program (needs a C++ compiler; takes tens of seconds)."""
    return aoti_compile_and_package(program, os.fspath(path))


def _refused(path: str, why: str, hint: str) -> ValidationError:
    return ValidationError([Diagnostic("error", f"garage will not load {path}: {why}", path, hint=hint)])


def load_artifact(path: str | os.PathLike[str], native: bool = False) -> Callable[..., Any]:
    """A callable `(input_ids=…, attention_mask=…) → logits` from a file written by `save` or `package`.

    The file is read once; a `.pt2` that would need pickle, or an AOTInductor package without
    `native=True`, is a ValidationError naming the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (OSError, zipfile.BadZipFile) as err:
        raise _refused(path, f"it is not a readable .pt2 archive ({err})", "give a file written by inj.save") from None
    if any("/aotinductor/" in name for name in archive.namelist()):
        if not native:
            raise _refused(path, "it is an AOTInductor package, compiled machine code that runs when loaded",
                           "load only packages you built yourself: garage.load_artifact(path, native=True)")
        return aoti_load_package(path)
    pickled = pt2_pickled_entries(archive)
    if pickled:
        more = f" and {len(pickled) - 3} more" if len(pickled) > 3 else ""
        raise _refused(path, f"loading it could unpickle code: {'; '.join(pickled[:3])}{more}",
                       "save programs with garage's inj.save, which stores tensors without pickle; load a file you "
                       "trust with torch.export.load yourself")
    try:
        return torch.export.load(io.BytesIO(data)).module()
    except Exception as err:  # a damaged program (nothing in it is unpickled with full pickle: checked above)
        raise _refused(path, f"torch cannot read the program in it ({type(err).__name__}: {err})",
                       "give a file written by inj.save with this torch version") from None
