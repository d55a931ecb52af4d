"""What discovery found in a model, as rows a reviewer can read: one per stack and kind of block.

garage finds each family's blocks and sublayers by discovery (`archs.py`) rather than from a table per
family. That covers families nobody wrote a row for, but a change in discovery would otherwise show only as
a numeric failure somewhere else. `docs/discovery.md` holds these rows for every family the sweep builds
(`python bench/discovery.py`), and a test regenerates them for a subset, so any change is a readable diff.

A hybrid's blocks differ (attention in some, a Mamba mixer in others; dense MLPs and mixtures of experts):
blocks that share the same sublayers make one row, with their indices.
"""

from __future__ import annotations

from ..lang.formatter import format_int_set
from .archs import ModelInfo

COLUMNS = ("family", "stack", "blocks", "attn", "attn_out", "mlp", "down", "router", "cross", "final")
NONE = "-"


def rows(family: str, info: ModelInfo) -> list[dict[str, str]]:
    """The discovery rows of one model: per stack (an encoder–decoder model's two), per kind of block."""
    out = []
    for stack in list(info.stacks.values()) or [info]:
        kinds: dict[tuple[str, ...], list[int]] = {}  # the sublayers a block has (NONE where absent) → its blocks
        for layer in range(stack.num_layers):
            parts: tuple[str | None, ...] = (stack.attn if layer in stack.attn_blocks else None, stack.attn_out,
                     stack.mlp if layer in stack.mlp_blocks else None, stack.down, stack.router, stack.cross)
            found = tuple(rel if rel is not None and stack.has(layer, rel) else NONE for rel in parts)
            kinds.setdefault(found, []).append(layer)
        for (attn, attn_out, mlp, down, router, cross), layers in kinds.items():
            out.append(dict(family=family, stack=stack.stack or NONE, blocks=f"{stack.blocks}.{format_int_set(tuple(layers))}",
                            attn=attn, attn_out=attn_out, mlp=mlp, down=down, router=router, cross=cross,
                            final=stack.final_norm or NONE))
    return out


def failed(family: str, why: str) -> dict[str, str]:
    """The row of a family that could not be built or described, with the first line of the reason."""
    reason = why.strip().splitlines()[0] if why.strip() else "unknown"
    return dict({c: NONE for c in COLUMNS}, family=family, blocks=f"(not described: {reason[:120]})")


def render(table: list[dict[str, str]]) -> list[str]:
    """Markdown table lines, header first."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return lines + ["| " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |" for row in table]


def _cell(column: str, text: str) -> str:
    """Module paths as code; the family, the stack, absences and reasons as they are."""
    plain = column in ("family", "stack") or text == NONE or text.startswith("(")
    return text.replace("|", "/") if plain else f"`{text}`"


def lines_of(text: str, family: str) -> list[str]:
    """The table lines of one family in a rendered snapshot."""
    return [line for line in text.splitlines() if line.startswith(f"| {family} |")]
