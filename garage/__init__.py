"""garage: a declarative injection compiler for transformer models."""

from .artifact import load_artifact
from .archs import ARCHS, ArchRow, ModelInfo
from .compiler import compile, hook
from .diagnostics import Diagnostic, GarageError, ResolveError, SpecError, ValidationError
from .formatter import format_spec as format
from .ops import register
from .package import InjectedModel
from .parse import load, parse
from .resolve import ConcreteSite, Plan, Step, resolve
from .spec import Spec
from .validate import Report, check

__all__ = [
    "ARCHS",
    "ArchRow",
    "ConcreteSite",
    "Diagnostic",
    "GarageError",
    "InjectedModel",
    "ModelInfo",
    "Plan",
    "Report",
    "ResolveError",
    "Spec",
    "SpecError",
    "Step",
    "ValidationError",
    "check",
    "compile",
    "format",
    "hook",
    "load_artifact",
    "load",
    "parse",
    "register",
    "resolve",
]
