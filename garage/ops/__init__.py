"""The ops: each an nn.Module mapping [batch, seq, hidden] to the same shape, used by both backends.

One file per op, its docstring giving its formula. Ops know nothing of specs, plans or graphs.
May import: torch, garage._compat and garage.sae (the SAE the SAE ops act through) only.
"""

from .ablate import Ablate
from .add import Add
from .base import Op, place, placement
from .blade import Blade, LiveSource, ModuleSource, TensorSource
from .capture import Capture
from .clamp import Clamp
from .condition import MAX_ROWS, Conditional
from .debate import Debate, chamber
from .experts import MaskExperts
from .heads import Heads
from .module import REGISTRY, register
from .noise import Noise
from .patch import Patch
from .positions import AtPositions, token_positions
from .sae import SaeCapture, SaeFeatures
from .scale import Scale
from .wrapper import Wrapper, innermost, takes_positions
from .zero import Zero

__all__ = [
    "Ablate", "Add", "AtPositions", "Blade", "Capture", "Clamp", "Conditional", "MAX_ROWS", "Debate", "Heads", "LiveSource", "MaskExperts", "ModuleSource",
    "Noise", "Op", "Patch", "REGISTRY", "SaeCapture", "SaeFeatures", "Scale", "TensorSource", "Wrapper", "Zero", "chamber", "innermost", "place",
    "placement", "register", "takes_positions", "token_positions",
]
