"""Can a sweep support laws at all? The ladder rules, checked on its results.

A law fitted to cells whose optimum is not bracketed, or whose best loss does not even fall as the model or
the budget grows, extrapolates noise. These are the rules the CPU ladder was designed to (docs/sweeps.md):

- every cell's landscape bends: the lrs tried span at least `lr_span` (8x) and the batches `batch_span` (4x),
  and at the best batch both the smallest and the largest lr tried are at least `edge_excess` (1%) worse
  than the cell's best (a diverged or failed edge run counts as worse);
- the best loss falls with N at every D, and with D at every N.

Losses are seed means per configuration (`cells.config_table`), as everywhere in the fitter.
"""

from __future__ import annotations

import math

import pandas as pd

from qwenjax.scaling.cells import CELL, config_table


def ladder_checks(df: pd.DataFrame, lr_span: float = 8.0, batch_span: float = 4.0,
                  edge_excess: float = 0.01) -> dict:
    """The ladder rules on a `load_results` table; JSON-ready: per-cell figures, the monotonicity, `ok`."""
    configs = config_table(df)
    tried = df[["n_params", "tokens", "lr", "batch_tokens"]].astype(float)
    cells = []
    for (n, d), group in configs.groupby(CELL, sort=True):
        all_runs = tried[(tried["n_params"] == n) & (tried["tokens"] == d)]
        best = group.loc[group["loss"].idxmin()]
        at_batch = all_runs[all_runs["batch_tokens"] == best["batch_tokens"]]
        loss_at = dict(zip(group[group["batch_tokens"] == best["batch_tokens"]]["lr"],
                           group[group["batch_tokens"] == best["batch_tokens"]]["loss"], strict=True))
        edges = {}
        for side, lr in (("low", at_batch["lr"].min()), ("high", at_batch["lr"].max())):
            loss = loss_at.get(lr, math.inf)  # not a valid run there: diverged or failed, so worse
            edges[side] = loss / best["loss"] - 1
        row = {
            "n_params": float(n), "tokens": float(d), "best_loss": float(best["loss"]),
            "best_lr": float(best["lr"]), "best_batch_tokens": float(best["batch_tokens"]),
            "lr_span": float(all_runs["lr"].max() / all_runs["lr"].min()),
            "batch_span": float(all_runs["batch_tokens"].max() / all_runs["batch_tokens"].min()),
            "low_edge_excess": float(edges["low"]), "high_edge_excess": float(edges["high"]),
        }
        row["bends"] = bool(row["lr_span"] >= lr_span * (1 - 1e-6) and row["batch_span"] >= batch_span * (1 - 1e-6)
                            and min(edges.values()) >= edge_excess)
        cells.append(row)
    table = pd.DataFrame(cells)
    falls = lambda by, along: all(  # noqa: E731
        (g.sort_values(along)["best_loss"].diff().dropna() < 0).all() for _, g in table.groupby(by))
    out = {
        "rules": {"lr_span": lr_span, "batch_span": batch_span, "edge_excess": edge_excess},
        "cells": cells,
        "cells_bending": int(table["bends"].sum()),
        "falls_with_n": bool(falls("tokens", "n_params")),
        "falls_with_d": bool(falls("n_params", "tokens")),
    }
    out["ok"] = bool(out["cells_bending"] == len(cells) and out["falls_with_n"] and out["falls_with_d"])
    return out


def ladder_message(checks: dict) -> str:
    """One line: do the results obey the ladder rules, and where not."""
    bad = [c for c in checks["cells"] if not c["bends"]]
    parts = [f"{checks['cells_bending']}/{len(checks['cells'])} cells bend (lr span >= "
             f"{checks['rules']['lr_span']:g}x, batch span >= {checks['rules']['batch_span']:g}x, lr edges >= "
             f"{checks['rules']['edge_excess']:.0%} worse)"]
    if bad:
        worst = ", ".join(f"N={c['n_params']:.3g} D={c['tokens']:.3g}" for c in bad[:3])
        parts.append(f"not: {worst}{' ...' if len(bad) > 3 else ''}")
    parts.append(f"best loss falls with N at every D: {'yes' if checks['falls_with_n'] else 'NO'}")
    parts.append(f"with D at every N: {'yes' if checks['falls_with_d'] else 'NO'}")
    return "ladder rules: " + "; ".join(parts)
