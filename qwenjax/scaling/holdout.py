"""Held-out validation: fit on the smaller cells, predict the larger ones, and charge what the prediction costs.

This is the check that matters for the product's question (which lr and batch for the *next* scale), and
the one leave-one-cell-out cannot make: it holds out every cell at the largest N and/or D at once, so the
laws must extrapolate. Each held-out cell reports its regret (the loss of the sweep run nearest the
prediction over the cell's best), the noise floor beside it, the predicted lr and batch as ratios to the
cell's optimum (its best run), and whether the bootstrap interval covered that optimum.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from qwenjax.errors import UserError
from qwenjax.scaling.cells import CELL, Cells
from qwenjax.scaling.hparams import check_cells, evaluate_law, fit_hparam_laws, summarize_regret
from qwenjax.scaling.noise import noise_floor
from qwenjax.scaling.units import format_count, parse_count

_BOUND = re.compile(r"^\s*([ND])\s*>=\s*(\S+)\s*$")
_USAGE = "--holdout must be 'largest', 'N>=X' or 'D>=Y' (X, Y counts like 2e5, 500k, 1M)"


def held_out_cells(spec: str, keys: pd.DataFrame) -> np.ndarray:
    """Mask over the cells (`keys`: n_params, tokens) that `spec` holds out; parts joined by commas add up.

    "largest" holds out every cell at the largest N and every cell at the largest D.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{_USAGE}, got {spec!r}")
    n, d = keys["n_params"].to_numpy(float), keys["tokens"].to_numpy(float)
    mask = np.zeros(len(keys), bool)
    for part in spec.split(","):
        if part.strip().lower() == "largest":
            mask |= (n == n.max()) | (d == d.max())
            continue
        match = _BOUND.match(part)
        if not match:
            raise UserError(f"{_USAGE}, got {spec!r}")
        try:
            bound = parse_count(match.group(2), "--holdout bound")
        except UserError:
            raise UserError(f"{_USAGE}, got {spec!r}") from None
        mask |= (n if match.group(1) == "N" else d) >= bound
    return mask


def _values(v) -> str:
    v = np.unique(v)
    return f"{len(v)} {'value' if len(v) == 1 else 'values'} ({', '.join(map(format_count, v))})"


def holdout_validation(df: pd.DataFrame, spec: str = "largest", **fit_options) -> dict:
    """Fit on the cells `spec` leaves, predict the held-out ones; the JSON-ready `holdout` entry of FIT.json.

    `fit_options` are `fit_hparam_laws`'s (method, tolerance, batch_law, bootstrap, seed, ...), so the held-out
    fit is the same fit as the full one, without its leave-one-cell-out pass.

    Raises UserError when the spec is malformed, holds out nothing, or leaves fewer than two N or two D
    values to fit.
    """
    cells = Cells(check_cells(df))
    mask = held_out_cells(spec, cells.keys)
    keys = cells.keys
    if not mask.any():
        raise UserError(
            f"--holdout {spec!r} holds out no cells (N: {_values(keys['n_params'])}, D: {_values(keys['tokens'])})"
        )
    kept = keys[~mask]
    if kept["n_params"].nunique() < 2 or kept["tokens"].nunique() < 2:
        raise UserError(
            f"--holdout {spec!r} leaves N: {_values(kept['n_params'])} and D: {_values(kept['tokens'])} "
            "to fit; the laws need two or more N and two or more D values"
        )
    held = set(map(tuple, keys[mask].to_numpy(float)))
    in_held = np.array([(float(n), float(d)) in held for n, d in df[CELL].to_numpy(float)], bool)
    try:
        fit = fit_hparam_laws(df[~in_held], **{**fit_options, "loo": False})
    except UserError as e:
        raise UserError(f"--holdout {spec!r}: {e}") from None
    floor = noise_floor(df)
    cell_noise = {(c["n_params"], c["tokens"]): c["relative_std"] for c in floor["cells"]}
    rows = []
    for i in np.flatnonzero(mask):
        n, d = (float(v) for v in keys.iloc[i])
        (lr, lr_ci), (batch, batch_ci) = (evaluate_law(fit["laws"][t], n, d) for t in ("lr", "batch_tokens"))
        row = cells.regret_row(i, float(np.log(lr)), float(np.log(batch)))
        j = cells.best_config(i)
        opt_lr, opt_b = float(cells.lr[j]), float(cells.batch[j])
        covered = lambda v, ci: None if not np.isfinite(ci).all() else bool(ci[0] <= v <= ci[1])
        row.update(
            lr_ci=[float(v) for v in lr_ci],
            batch_tokens_ci=[float(v) for v in batch_ci],
            optimum_lr=opt_lr,
            optimum_batch_tokens=opt_b,
            lr_ratio=float(lr) / opt_lr,
            batch_ratio=float(batch) / opt_b,
            lr_covered=covered(opt_lr, lr_ci),
            batch_covered=covered(opt_b, batch_ci),
            noise=cell_noise.get((n, d), floor["relative"]),
        )
        rows.append(row)
    count = lambda key: sum(r[key] is True for r in rows)
    return {
        "spec": spec,
        "method": "fit the chosen estimator on the cells left, predict each held-out cell; regret = seed-mean "
        "loss of its configuration nearest (in log lr, log B) to the prediction / its best - 1; ratios and "
        "coverage against the cell's best configuration",
        "estimator": fit["method"]["estimator"],
        "cells_fitted": int((~mask).sum()),
        "cells_held_out": int(mask.sum()),
        "fitted_n_params": sorted(float(v) for v in kept["n_params"].unique()),
        "fitted_tokens": sorted(float(v) for v in kept["tokens"].unique()),
        **summarize_regret(rows),
        "noise_floor": floor["relative"],
        "lr_covered": count("lr_covered"),
        "batch_covered": count("batch_covered"),
        "laws": {t: {"log_coef": law["log_coef"], "coef": law["coef"]} for t, law in fit["laws"].items()},
        "per_cell": rows,
    }
