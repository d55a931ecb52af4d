"""Saved artefacts: an injected model as a torch.export program that runs without garage.

`save` writes a `.pt2` program whose inputs are `input_ids` and `attention_mask` and whose output is the
logits tensor, so plain torch can run it (`torch.export.load(path).module()(input_ids=…, attention_mask=…)`)
without transformers' output classes. The injected ops and their parameters are inside the program.
`package` compiles it ahead of time with AOTInductor, where the machine has a C++ compiler.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Callable

import torch
from torch import nn

from .._compat import aoti_compile_and_package, aoti_load_package
from ..fx.export import EXAMPLE_BATCH, EXAMPLE_SEQ


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


def is_aoti_package(path: str) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any("/aotinductor/" in name for name in archive.namelist())


def load_artifact(path: str | os.PathLike[str]) -> Callable[..., Any]:
    """A callable `(input_ids=…, attention_mask=…) → logits` from a file written by `save` or `package`."""
    path = os.fspath(path)
    if is_aoti_package(path):
        return aoti_load_package(path)
    return torch.export.load(path).module()
