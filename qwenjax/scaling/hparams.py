"""Hyperparameter scaling laws: where the optimal learning rate and batch size go as N and D grow.

Method (DeepSeek LLM §3.1, Step Law): group runs by (N, D) cell, take each cell's optimum, fit
    log lr* = log a + alpha log N + beta log D,      log B* = log b + gamma log N + delta log D
by least squares in log space (B in tokens; `batch_law="D"` drops N, as Step Law finds B* independent of it),
and bootstrap over cells for intervals. The optimum of a cell is either every run within `tolerance` of
its best loss ("nearopt", the papers' rule, robust to a coarse grid) or the vertex of a quadratic in
(log lr, log B) fitted to the runs near the minimum ("smooth", which can land between grid points).

Every fit -- the full one, each bootstrap resample, each leave-one-cell-out refit -- is the same weighted
least-squares solve over per-cell sufficient statistics, so all of them run as one batched linear solve.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qwenjax.errors import UserError
from qwenjax.scaling.bootstrap import CI_LEVEL, interval
from qwenjax.scaling.units import format_count

_CELL = ["n_params", "tokens"]
#: target column -> (prefactor name, {input: exponent name})
_NAMES = {
    "lr": ("a", {"N": "alpha", "D": "beta"}),
    "batch_tokens": ("b", {"N": "gamma", "D": "delta"}),
}


def law_inputs(target: str, batch_law: str = "ND") -> tuple[str, ...]:
    """Which of N, D a law depends on."""
    if batch_law not in ("ND", "D"):
        raise UserError(f"--batch-law must be ND or D, got {batch_law!r}")
    return ("D",) if target == "batch_tokens" and batch_law == "D" else ("N", "D")


def features(inputs, n_params, tokens) -> np.ndarray:
    """Design rows [1, log N?, log D?] (last axis) for a law with the given inputs; broadcasts N and D."""
    n, d = np.broadcast_arrays(np.asarray(n_params, float), np.asarray(tokens, float))
    logs = {"N": np.log(n), "D": np.log(d)}
    return np.stack([np.ones_like(n)] + [logs[i] for i in inputs], axis=-1)


def check_cells(df: pd.DataFrame) -> pd.DataFrame:
    """The successful runs, once checked that they can support laws in N and D (else one clear UserError)."""
    valid = df[df["valid"]]
    if valid.empty:
        counts = df["status"].value_counts().to_dict()
        detail = ", ".join(f"{v} {k}" for k, v in counts.items())
        column = df.attrs.get("loss_column", "loss")
        raise UserError(
            f"none of the {len(df)} runs can count as an optimum ({detail}; ok runs need a finite "
            f"{column}); nothing to fit"
        )
    ns, ds = np.unique(valid["n_params"]), np.unique(valid["tokens"])
    if len(ns) < 2 or len(ds) < 2:
        found = lambda v: (
            f"{len(v)} {'value' if len(v) == 1 else 'values'} ({', '.join(map(format_count, v))})"
        )
        raise UserError(
            f"the laws need successful runs at two or more N and two or more D values; "
            f"found N: {found(ns)}, D: {found(ds)}"
        )
    cells = np.log(valid[_CELL].drop_duplicates().to_numpy(float))
    if np.linalg.matrix_rank(np.column_stack([np.ones(len(cells)), cells])) < 3:
        raise UserError(
            "the (N, D) cells lie on one line in log space, so the effects of N and D cannot be "
            "separated; add a cell off that line (e.g. another D at an existing N)"
        )
    return valid


def _quadratic_vertex(x: np.ndarray, y: np.ndarray | None, z: np.ndarray):
    """Vertex of a least-squares quadratic z(x[, y]) if it is a minimum inside the sampled box, else None."""
    cols = [np.ones_like(x), x, x**2] if y is None else [np.ones_like(x), x, y, x**2, x * y, y**2]
    c = np.linalg.lstsq(np.column_stack(cols), z, rcond=None)[0]
    if y is None:
        if c[2] <= 0:
            return None
        v = np.array([-c[1] / (2 * c[2])])
        box = [x]
    else:
        hess = np.array([[2 * c[3], c[4]], [c[4], 2 * c[5]]])
        if np.any(np.linalg.eigvalsh(hess) <= 0):
            return None
        v = np.linalg.solve(hess, -c[1:3])
        box = [x, y]
    if any(not (b.min() <= vi <= b.max()) for vi, b in zip(v, box, strict=True)):
        return None
    return v


def _smooth_optimum(runs: pd.DataFrame, window: float):
    """(lr, batch_tokens, method) from a quadratic in log space near the cell minimum; None if degenerate."""
    best = runs["loss"].min()
    near = runs[runs["loss"] <= best * (1 + window)]
    x, y, z = (
        np.log(near["lr"].to_numpy()),
        np.log(near["batch_tokens"].to_numpy()),
        np.log(near["loss"].to_numpy()),
    )
    if len(near) >= 8 and len(np.unique(x)) >= 3 and len(np.unique(y)) >= 3:
        v = _quadratic_vertex(x - x.mean(), y - y.mean(), z)
        if v is not None:
            return float(np.exp(v[0] + x.mean())), float(np.exp(v[1] + y.mean())), "quadratic"
    best_batch = runs.loc[runs["loss"].idxmin(), "batch_tokens"]
    at = near["batch_tokens"] == best_batch
    xb = x[at.to_numpy()]
    if at.sum() >= 4 and len(np.unique(xb)) >= 3:
        v = _quadratic_vertex(xb - xb.mean(), None, z[at.to_numpy()])
        if v is not None:
            return float(np.exp(v[0] + xb.mean())), float(best_batch), "quadratic-lr"
    return None


def cell_optima(
    df: pd.DataFrame, tolerance: float = 0.0025, method: str = "nearopt", smooth_window: float = 0.05
) -> pd.DataFrame:
    """One row per optimum point: n_params, tokens, lr, batch_tokens, best_loss, method.

    "nearopt" gives every run within `tolerance` of the cell's best loss (several rows per cell);
    "smooth" gives one quadratic vertex per cell, falling back to "nearopt" where the quadratic is
    degenerate (too few distinct values, not convex, or its vertex outside the sampled grid).
    """
    if method not in ("nearopt", "smooth"):
        raise UserError(f"--method must be nearopt or smooth, got {method!r}")
    if not tolerance >= 0:
        raise UserError(f"--tolerance must be >= 0, got {tolerance}")
    rows = []
    for (n, d), runs in check_cells(df).groupby(_CELL, sort=True):
        best = float(runs["loss"].min())
        vertex = _smooth_optimum(runs, smooth_window) if method == "smooth" else None
        if vertex is not None:
            rows.append((n, d, vertex[0], vertex[1], best, vertex[2]))
            continue
        for _, run in runs[runs["loss"] <= best * (1 + tolerance)].iterrows():
            rows.append((n, d, run["lr"], run["batch_tokens"], best, "nearopt"))
    return pd.DataFrame(rows, columns=[*_CELL, "lr", "batch_tokens", "best_loss", "method"])


class _CellRegression:
    """Weighted least squares of log(target) on log N / log D, with cells as the unit of resampling.

    Per-cell sums of x x^T and x y mean a fit for any cell weighting (bootstrap counts, leave-one-out
    zeros) is a 3x3 solve; inputs are centred so the solve is well conditioned.
    """

    def __init__(self, optima: pd.DataFrame, target: str, inputs: tuple[str, ...]):
        self.target, self.inputs = target, inputs
        self.cells = optima[_CELL].drop_duplicates().reset_index(drop=True)
        cell_index = optima[_CELL].merge(self.cells.reset_index(), on=_CELL)["index"].to_numpy()
        self.center = features(inputs, self.cells["n_params"], self.cells["tokens"]).mean(axis=0)
        self.center[0] = 0.0
        self.x = features(inputs, optima["n_params"], optima["tokens"]) - self.center
        self.y = np.log(optima[target].to_numpy(float))
        k = self.x.shape[1]
        self.xtx = np.zeros((len(self.cells), k, k))
        self.xty = np.zeros((len(self.cells), k))
        np.add.at(self.xtx, cell_index, self.x[:, :, None] * self.x[:, None, :])
        np.add.at(self.xty, cell_index, self.x * self.y[:, None])

    def solve(self, weights: np.ndarray) -> np.ndarray:
        """Coefficients [log prefactor, exponents...] per row of cell weights; NaN rows where degenerate."""
        weights = np.asarray(weights, float).reshape(-1, len(self.cells))
        xtx = np.einsum("sc,cij->sij", weights, self.xtx)
        xty = np.einsum("sc,ci->si", weights, self.xty)
        if not len(weights):
            return xty
        eig = np.linalg.eigvalsh(xtx)
        ok = eig[:, 0] > 1e-9 * np.maximum(eig[:, -1], 1e-300)
        coef = np.full(xty.shape, np.nan)
        if ok.any():
            coef[ok] = np.linalg.solve(xtx[ok], xty[ok][..., None])[..., 0]
        coef[:, 0] -= coef @ self.center  # back to uncentred log N, log D
        return coef


def _law_dict(reg: _CellRegression, samples: np.ndarray) -> dict:
    target, inputs = reg.target, reg.inputs
    coef = reg.solve(np.ones(len(reg.cells)))[0]
    prefactor, exponent_names = _NAMES[target]
    names = [prefactor] + [exponent_names[i] for i in inputs]
    good = samples[np.isfinite(samples).all(axis=1)]
    values = [np.exp(coef[0]), *coef[1:]]
    if len(good):
        lo, hi = interval(good)
        cis = [[float(np.exp(lo[0])), float(np.exp(hi[0]))]] + [
            [float(lo[j]), float(hi[j])] for j in range(1, len(coef))
        ]
    else:
        cis = [[None, None]] * len(coef)
    resid = reg.y - (reg.x + reg.center) @ coef
    total = np.sum((reg.y - reg.y.mean()) ** 2)
    symbol = {"lr": "lr", "batch_tokens": "B"}[target]
    return {
        "formula": f"{symbol} = {names[0]}"
        + "".join(f" * {i}^{n}" for i, n in zip(inputs, names[1:], strict=True)),
        "target": target,
        "inputs": list(inputs),
        "coef": {n: {"value": float(v), "ci": c} for n, v, c in zip(names, values, cis, strict=True)},
        "log_coef": [float(c) for c in coef],
        "r2": float(1 - np.sum(resid**2) / total) if total > 0 else 1.0,
        "rmse_log": float(np.sqrt(np.mean(resid**2))),
        "points": int(len(reg.y)),
        "cells": int(len(reg.cells)),
        "bootstrap": {"samples": good.tolist(), "failed": int(len(samples) - len(good))},
    }


def evaluate_law(law: dict, n_params, tokens):
    """(value, (lo, hi)) of a fitted power law at N, D; the interval is the bootstrap percentile band."""
    x = features(law["inputs"], n_params, tokens)
    value = np.exp(x @ np.asarray(law["log_coef"]))
    samples = np.asarray(law["bootstrap"]["samples"], float).reshape(-1, len(law["log_coef"]))
    if not len(samples):
        return value, (value * np.nan, value * np.nan)
    draws = np.exp(x @ samples.T)
    lo, hi = interval(draws, axis=-1)
    return value, (lo, hi)


def _loo_regret(df: pd.DataFrame, regs: dict[str, _CellRegression]) -> dict:
    """Leave-one-cell-out: refit without a cell, predict it, and charge the loss of its nearest sweep run."""
    cells = regs["lr"].cells
    weights = 1.0 - np.eye(len(cells))
    coefs = {t: r.solve(weights) for t, r in regs.items()}
    valid = df[df["valid"]]
    rows, skipped = [], 0
    for i, (n, d) in enumerate(cells.itertuples(index=False)):
        if any(not np.isfinite(c[i]).all() for c in coefs.values()):
            skipped += 1
            continue
        pred = {t: features(r.inputs, n, d) @ coefs[t][i] for t, r in regs.items()}  # log lr, log B
        runs = valid[(valid["n_params"] == n) & (valid["tokens"] == d)]
        dist = (np.log(runs["lr"]) - pred["lr"]) ** 2 + (
            np.log(runs["batch_tokens"]) - pred["batch_tokens"]
        ) ** 2
        nearest = runs.loc[dist.idxmin()]
        rows.append(
            {
                "n_params": float(n),
                "tokens": float(d),
                "lr": float(np.exp(pred["lr"])),
                "batch_tokens": float(np.exp(pred["batch_tokens"])),
                "nearest_lr": float(nearest["lr"]),
                "nearest_batch_tokens": float(nearest["batch_tokens"]),
                "regret": float(nearest["loss"] / runs["loss"].min() - 1),
            }
        )
    regret = np.array([r["regret"] for r in rows])
    summary = (
        {"mean": float(regret.mean()), "median": float(np.median(regret)), "max": float(regret.max())}
        if len(rows)
        else {"mean": None, "median": None, "max": None}
    )
    return {
        "method": "leave-one-cell-out; regret = loss of the cell's sweep run nearest (in log lr, log B) "
        "to the prediction / cell best loss - 1",
        **summary,
        "cells_evaluated": len(rows),
        "cells_skipped": skipped,
        "per_cell": rows,
    }


def fit_hparam_laws(
    df: pd.DataFrame,
    tolerance: float = 0.0025,
    method: str = "nearopt",
    batch_law: str = "ND",
    bootstrap: int = 1000,
    seed: int = 0,
    smooth_window: float = 0.05,
) -> dict:
    """Fit lr*(N, D) and B*(N, D) (or B*(D)) with bootstrap CIs and leave-one-cell-out regret.

    Returns a JSON-ready dict: `laws` {"lr", "batch_tokens"}, `regret`, `cell_optima`, `method`.
    """
    optima = cell_optima(df, tolerance, method, smooth_window)
    regs = {t: _CellRegression(optima, t, law_inputs(t, batch_law)) for t in ("lr", "batch_tokens")}
    n_cells = len(regs["lr"].cells)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_cells, (max(int(bootstrap), 0), n_cells))
    weights = np.zeros((len(draws), n_cells))
    np.add.at(weights, (np.arange(len(draws))[:, None], draws), 1.0)
    laws = {t: _law_dict(r, r.solve(weights)) for t, r in regs.items()}
    per_cell = []
    for (n, d), group in optima.groupby(_CELL, sort=True):
        per_cell.append(
            {
                "n_params": float(n),
                "tokens": float(d),
                "best_loss": float(group["best_loss"].iloc[0]),
                "method": group["method"].iloc[0],
                "optima": group[["lr", "batch_tokens"]].to_numpy(float).tolist(),
            }
        )
    return {
        "method": {
            "optimum": method,
            "tolerance": tolerance,
            "smooth_window": smooth_window if method == "smooth" else None,
            "batch_law": batch_law,
            "bootstrap": int(bootstrap),
            "seed": seed,
            "ci_level": CI_LEVEL,
            "cells_by_method": optima.drop_duplicates(_CELL)["method"].value_counts().to_dict(),
        },
        "laws": laws,
        "regret": _loo_regret(df, regs),
        "cell_optima": per_cell,
    }
