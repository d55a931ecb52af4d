"""Pictures of analysis results, drawn with matplotlib (an optional extra: `pip install "garage[plot]"`).

A heatmap's size follows from its table, so that a picture of a table of R rows and C columns is always
the same number of pixels: (300 + 45·C) × (150 + 30·R) at 100 dpi, and at least 500 × 300; a steering
curve is 700 × 600. Nothing is drawn through pyplot's global state: each picture is its own Figure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .patching import PatchingResult
from .steering import StrengthSweep

DPI = 100
CURVE_PIXELS = (700, 600)
PLOT_INSTALL = 'pip install "garage[plot]"  (or: pip install matplotlib)'


def figure_pixels(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a heatmap of this many rows and columns."""
    return max(500, 300 + 45 * columns), max(300, 150 + 30 * rows)


def require() -> Any:
    """matplotlib's Figure class; a ValueError that says how to install it when it is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError(f"drawing a picture needs matplotlib, which is not installed: {PLOT_INSTALL}") from None
    return Figure


def _figure(width: int, height: int) -> Any:
    return require()(figsize=(width / DPI, height / DPI), dpi=DPI)


def _shown(token: str) -> str:
    return token.replace("\n", "\\n").replace(" ", "␣") or "∅"


def heatmap(result: PatchingResult, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """A patching sweep as a PNG: sites down, tokens (or heads) across, and a colour bar of how much of the
    clean run each cell restores (0 = corrupt, 1 = clean); blue is below 0, red above."""
    table = result.table.float().numpy()
    rows, columns = table.shape
    fig = _figure(*figure_pixels(rows, columns))
    ax = fig.add_subplot()
    limit = max(1.0, float(abs(table).max()))
    image = ax.imshow(table, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    heads = result.columns[0].startswith("head ")
    labels = result.columns if heads else [_shown(c) for c in result.columns]  # a token's spaces made visible
    ax.set_xticks(range(columns), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(rows), result.rows, fontsize=8 if rows <= 32 else 6)
    across = "head" if heads else "token (clean prompt)"
    ax.set_xlabel(across)
    ax.set_ylabel("site")
    what = "attribution patching (estimate)" if result.method == "attribution" else "activation patching"
    ax.set_title(title or f"{what}: clean {result.clean:.2f}, corrupt {result.corrupt:.2f}", fontsize=9)
    fig.colorbar(image, ax=ax, label="restored: 0 = corrupt, 1 = clean")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def curves(sweep: StrengthSweep, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """A steering sweep as a PNG: the effect against the coefficient above, and the damage below (the
    held-out perplexity on the left axis, log scale, the KL from the plain model on the right)."""
    fig = _figure(*CURVE_PIXELS)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = sweep.coefficients
    top.plot(x, sweep.effect, marker="o", color="tab:blue")
    top.axhline(sweep.effect[x.index(0.0)] if 0.0 in x else 0.0, color="grey", linewidth=0.8, linestyle=":")
    top.set_ylabel("effect: log p(good) − log p(bad)", fontsize=8)
    top.set_title(title or f"steering curve: {sweep.statement}", fontsize=9)
    bottom.plot(x, sweep.perplexity, marker="o", color="tab:red", label="perplexity (held-out text)")
    bottom.set_yscale("log")  # it grows by orders of magnitude at large strengths
    bottom.set_ylabel("perplexity (log scale)", color="tab:red", fontsize=8)
    twin = bottom.twinx()
    twin.plot(x, sweep.kl, marker="s", color="tab:green", label="KL from the plain model")
    twin.set_ylabel("KL (nats)", color="tab:green", fontsize=8)
    bottom.set_xlabel("coefficient")
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out = Path(path)
    fig.savefig(out, format="png")
    return out
