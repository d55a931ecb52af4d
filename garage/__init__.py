"""garage: a declarative injection compiler for transformer models."""

from .archs import ARCHS, ArchRow, ModelInfo
from .diagnostics import Diagnostic, GarageError, ResolveError, SpecError, ValidationError
from .formatter import format_spec as format
from .parse import load, parse
from .resolve import ConcreteSite, Plan, Step, resolve
from .spec import Spec

__all__ = [
    "ARCHS",
    "ArchRow",
    "ConcreteSite",
    "Diagnostic",
    "GarageError",
    "ModelInfo",
    "Plan",
    "ResolveError",
    "Spec",
    "SpecError",
    "Step",
    "ValidationError",
    "format",
    "load",
    "parse",
    "resolve",
]
