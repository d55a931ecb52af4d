"""garage: a declarative injection compiler for transformer models.

The pipeline, one subpackage a stage, each importing only the stages before it:

    lang     text → Spec                  (grammar, AST, parser, formatter, diagnostics)
    ops      the op modules               (one nn.Module a file; both backends run them)
    plan     Spec + model → Plan → ops    (architecture discovery, resolver, files, op building)
    fx       model → injected graphs      (torch.export, site location, graph rewrite)
    check    graph checks and lints       (fake-tensor shapes, networkx, blade rules)
    runtime  InjectedModel and hooks      (scoring, generation, torch.compile, .pt2)

`compiler` (compile, hook), `patching`, `steering`, `pictures`, `analyze`, `vectors`, `features`, `blades`,
`training` and `cli` sit on top (`models`, models by name, and `sae`, SAELens folders, below every stage);
`core` and `inject` keep the seed library's import paths. Private torch and transformers APIs are used
only in `_compat`.
"""

from . import analyze, blades, features, patching, pictures, sae, steering, vectors
from ._version import __version__
from .check.validate import Report, check
from .compiler import compile, hook
from .lang.diagnostics import (
    Diagnostic,
    GarageError,
    GarageWarning,
    ResolveError,
    SpecError,
    ValidationError,
)
from .lang.formatter import format_spec as format
from .lang.parse import load, parse
from .lang.spec import Spec
from .ops import register
from .plan.archs import ARCHS, ArchRow, ModelInfo
from .plan.resolve import ConcreteSite, Plan, Step, resolve
from .runtime.artifact import load_artifact
from .runtime.injected import InjectedModel
from .training import History, train

__all__ = [
    "ARCHS",
    "ArchRow",
    "ConcreteSite",
    "Diagnostic",
    "GarageError",
    "GarageWarning",
    "History",
    "InjectedModel",
    "ModelInfo",
    "Plan",
    "Report",
    "ResolveError",
    "Spec",
    "SpecError",
    "Step",
    "ValidationError",
    "__version__",
    "analyze",
    "blades",
    "check",
    "compile",
    "features",
    "format",
    "hook",
    "load",
    "load_artifact",
    "parse",
    "patching",
    "pictures",
    "register",
    "resolve",
    "sae",
    "steering",
    "train",
    "vectors",
]
