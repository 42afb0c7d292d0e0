"""PNGs of the long-context evals, drawn as `qwenjax.scaling.plots` draws: a bare matplotlib Figure on an
Agg canvas (no pyplot global state); each `plot_*` returns the Figure and, given `path`, writes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qwenjax.evals.passkey import accuracy_grid, format_length

DPI = 110


def _save(fig: Figure, path) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    return fig


def plot_passkey(table: dict, path=None, title: str | None = None) -> Figure:
    """Heatmap of accuracy: depth (rows, 0 = start of the text) x length (columns); lengths beyond
    max_position_embeddings are marked with '*' and a dashed line."""
    lengths, depths = table["lengths"], table["depths"]
    grid = accuracy_grid(table)
    fig = Figure(figsize=(max(4.5, 1.6 + 0.75 * len(lengths)), 1.6 + 0.45 * len(depths)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2g}", ha="center", va="center", fontsize=8)
    beyond = set(table.get("beyond_max_position_embeddings", []))
    ax.set_xticks(range(len(lengths)), [format_length(n) + ("*" if n in beyond else "") for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    if beyond and len(beyond) < len(lengths):
        ax.axvline(len(lengths) - len(beyond) - 0.5, color="k", ls="--", lw=1)
    ax.set_xlabel("context length (tokens)" + ("\n* beyond max_position_embeddings" if beyond else ""))
    ax.set_ylabel("key depth")
    ax.set_title(title or f"passkey accuracy ({table['trials']} trials per cell)")
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save(fig, path)


def plot_ppl_by_position(table: dict, path=None, title: str | None = None) -> Figure:
    """Mean loss per position bucket (nats), with max_position_embeddings as a dashed line when in range."""
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    mids = [(b["start"] + b["end"]) / 2 for b in table["buckets"]]
    ax.plot(mids, [b["loss"] for b in table["buckets"]], marker="o", ms=3)
    limit = table.get("max_position_embeddings")
    if limit is not None and limit < table["length"]:
        ax.axvline(limit, color="k", ls="--", lw=1, label="max_position_embeddings")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("position (tokens of context)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or f"loss by position ({table['sequences']} windows of {table['length']}, "
                          f"buckets of {table['bucket']})")
    ax.grid(alpha=0.3)
    return _save(fig, path)
