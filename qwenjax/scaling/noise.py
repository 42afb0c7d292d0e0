"""How much of a loss difference is luck: the seed noise at each cell's optimum, and a fallback estimate.

A regret of 0.3% means little when two seeds of the same run differ by 0.5%, so every regret is reported
next to this floor, and the fitter weights cells by how well the noise lets their optimum be located.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qwenjax.scaling.cells import CELL, CONFIG, Cells

#: Relative noise assumed for weighting when neither repeated seeds nor the landscape can measure it.
DEFAULT_NOISE = 0.0025
_METHOD = (
    "valid runs grouped by (N, D, lr, batch); among groups with two or more distinct seeds, each (N, D) "
    "cell's group with the lowest mean loss; relative std (ddof=1) of its per-seed losses over their mean; "
    "relative = root mean square over cells"
)


def noise_floor(df: pd.DataFrame) -> dict:
    """The seed noise at each cell's optimum, from a `load_results` table; JSON-ready.

    Returns `relative` (the pooled relative std: root mean square of the per-cell figures), `cells` (per
    cell: n_params, tokens, lr, batch_tokens, seeds, losses, relative_std), `seeds` (the fewest seeds behind
    a measured cell), `cells_measured`, `cells_total` and `method`. With no repeated seeds anywhere,
    `relative` is None and `note` says so.
    """
    valid = df[df["valid"]] if "valid" in df.columns else df
    cells_total = int(len(valid[CELL].drop_duplicates()))
    out = {"relative": None, "cells": [], "seeds": 0, "cells_measured": 0, "cells_total": cells_total}
    if "seed" in valid.columns and valid["seed"].notna().any():
        runs = valid[valid["seed"].notna()]
        per_seed = runs.groupby([*CONFIG, "seed"], sort=True)["loss"].mean().reset_index()
        groups = per_seed.groupby(CONFIG, sort=True)["loss"]
        stats = groups.agg(["mean", "size", "std"]).reset_index()
        stats = stats[stats["size"] >= 2]
        if len(stats):
            best = stats.loc[stats.groupby(CELL, sort=True)["mean"].idxmin()]
            rows = []
            for _, g in best.iterrows():
                at = per_seed[(per_seed[CONFIG] == g[CONFIG]).all(axis=1)]
                rows.append(
                    {
                        "n_params": float(g["n_params"]),
                        "tokens": float(g["tokens"]),
                        "lr": float(g["lr"]),
                        "batch_tokens": float(g["batch_tokens"]),
                        "seeds": [s.item() if isinstance(s, np.generic) else s for s in at["seed"]],
                        "losses": [float(v) for v in at["loss"]],
                        "relative_std": float(g["std"] / g["mean"]),
                    }
                )
            rel = np.array([r["relative_std"] for r in rows])
            out.update(
                relative=float(np.sqrt(np.mean(rel**2))),
                cells=rows,
                seeds=int(min(len(r["losses"]) for r in rows)),
                cells_measured=len(rows),
            )
    out["method"] = _METHOD
    if out["relative"] is None:
        out["note"] = "not measured: no configuration was run with two or more seeds"
    return out


def landscape_noise(cells: Cells, window: float = 0.05) -> float | None:
    """Relative per-run noise from the scatter of each cell's runs about a quadratic in (log lr, log B).

    Fitted to the seed-mean log loss of configurations within `window` of the cell best (2-D where the cell
    has 8 or more with 3 distinct values of each, else along lr in each batch row with 4 or more lrs);
    residuals are scaled to one seed and pooled. It includes any misfit of the quadratic, so it errs high.
    None when no cell has enough runs.
    """
    rss, dof = 0.0, 0
    for i, s in enumerate(cells.slices):
        near = cells.loss[s] <= cells.best[i] * (1 + window)
        x, y = cells.log_lr[s][near], cells.log_b[s][near]
        z, w = np.log(cells.loss[s][near]), cells.seeds[s][near]
        groups = []
        if len(x) >= 8 and len(np.unique(x)) >= 3 and len(np.unique(y)) >= 3:
            x, y = x - x.mean(), y - y.mean()
            groups.append((np.column_stack([np.ones_like(x), x, y, x * x, x * y, y * y]), z, w))
        else:
            for b in np.unique(y):
                at = y == b
                if at.sum() >= 4 and len(np.unique(x[at])) >= 4:
                    xb = x[at] - x[at].mean()
                    groups.append((np.column_stack([np.ones_like(xb), xb, xb * xb]), z[at], w[at]))
        for a, zz, ww in groups:
            sw = np.sqrt(ww)
            coef = np.linalg.lstsq(a * sw[:, None], zz * sw, rcond=None)[0]
            rss += float(np.sum(ww * (zz - a @ coef) ** 2))
            dof += len(zz) - a.shape[1]
    return float(np.sqrt(rss / dof)) if dof > 0 else None


def weighting_noise(floor: dict, cells: Cells) -> tuple[float, str]:
    """(relative per-run noise, where it came from) for weighting cells: measured, else estimated, else assumed."""
    if floor.get("relative"):
        return float(floor["relative"]), "measured (noise floor)"
    estimate = landscape_noise(cells)
    if estimate:
        return estimate, "estimated from the scatter of runs about a quadratic near each optimum"
    return DEFAULT_NOISE, "assumed (no repeated seeds and too few runs per cell to estimate it)"


def format_noise(floor: dict | None) -> str:
    """'noise floor 0.18%' or 'noise floor not measured', for printing beside a regret."""
    if not floor or floor.get("relative") is None:
        return "noise floor not measured"
    return f"noise floor {floor['relative']:.2%}"
