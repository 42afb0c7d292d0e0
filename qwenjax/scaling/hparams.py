"""Hyperparameter scaling laws: where the optimal learning rate and batch size go as N and D grow.

Method (DeepSeek LLM §3.1, Step Law): group runs by (N, D) cell, locate each cell's optimum, fit
    log lr* = log a + alpha log N + beta log D,      log B* = log b + gamma log N + delta log D
in log space (B in tokens; `batch_law="D"` drops N, as Step Law finds B* independent of it), and bootstrap
over cells for intervals. Losses are averaged over seeds per configuration first (`cells.py`). Estimators:

- "nearopt": each cell's optimum is the centroid of its runs within `tolerance` of the best (the papers' rule);
- "smooth": the vertex of a quadratic in (log lr, log B) fitted near the minimum (can land between grid points);
- "prior": nearopt optima, exponents shrunk toward a prior (Step Law's by default) by a Gaussian-prior MAP;
- "surface": one joint fit of every run near each optimum to a bowl whose centre follows the laws (`surface.py`).

The first three weight each cell by the inverse variance of its optimum: the scatter of the optimum when the
cell's runs are redrawn with the measured seed noise, plus the grid's quantisation, plus a between-cell
variance (Paule-Mandel) for what the noise does not explain. Every fit -- the full one, each bootstrap
resample, each leave-one-cell-out refit -- is then one batched linear solve over per-cell statistics.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qwenjax.errors import UserError
from qwenjax.scaling.bootstrap import CI_LEVEL, interval
from qwenjax.scaling.cells import CELL, Cells
from qwenjax.scaling.noise import noise_floor, weighting_noise
from qwenjax.scaling.prior import parse_prior
from qwenjax.scaling.surface import SURFACE_WINDOW, SurfaceEstimator
from qwenjax.scaling.units import format_count

_CELL = CELL
#: target column -> (prefactor name, {input: exponent name})
_NAMES = {
    "lr": ("a", {"N": "alpha", "D": "beta"}),
    "batch_tokens": ("b", {"N": "gamma", "D": "delta"}),
}
TARGETS = ("lr", "batch_tokens")
ESTIMATORS = ("nearopt", "smooth", "surface", "prior")
#: The estimator with the lowest measured held-out regret (docs/scaling.md, "Choosing the estimator").
DEFAULT_METHOD = "smooth"
#: Noisy redraws of each cell used to measure the spread of its optimum.
UNCERTAINTY_DRAWS = 128
#: Variance (log units^2) of an optimum along an axis the cell did not vary: it says nothing about it.
_UNSWEPT_VAR = np.log(8.0) ** 2


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


def _quadratic_vertices(x: np.ndarray, y: np.ndarray | None, z: np.ndarray) -> np.ndarray:
    """Vertices (K, dims) of least-squares quadratics z_k(x[, y]) (z: (K, m)); NaN rows where a vertex is
    not a minimum inside the sampled box."""
    z = np.atleast_2d(z)
    cols = [np.ones_like(x), x, x**2] if y is None else [np.ones_like(x), x, y, x**2, x * y, y**2]
    c = np.linalg.lstsq(np.column_stack(cols), z.T, rcond=None)[0]  # (p, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        if y is None:
            ok = c[2] > 0
            v = (-c[1] / (2 * c[2]))[:, None]
            box = [x]
        else:
            a, b, d = 2 * c[3], c[4], 2 * c[5]
            det = a * d - b * b
            ok = (a > 0) & (det > 0)
            v = np.stack([-(d * c[1] - b * c[2]) / det, -(a * c[2] - b * c[1]) / det], axis=1)
            box = [x, y]
    for j, b in enumerate(box):
        ok &= (b.min() <= v[:, j]) & (v[:, j] <= b.max())
    v[~ok] = np.nan
    return v


class _CellRule:
    """How one cell's optimum is located ("nearopt", or "quadratic" / "quadratic-lr" for smooth), applied
    to the observed losses or to (K, m) noisy redraws of them alike."""

    def __init__(self, x, y, loss, method: str, tolerance: float, window: float):
        self.x, self.y, self.tolerance = x, y, tolerance
        self.kind, self.mask = "nearopt", None
        if method != "smooth":
            return
        near = loss <= loss.min() * (1 + window)
        if near.sum() >= 8 and len(np.unique(x[near])) >= 3 and len(np.unique(y[near])) >= 3:
            self.kind, self.mask = "quadratic", near
            if np.isfinite(self._vertex(loss[None])).all():
                return
        at = near & (y == y[np.argmin(loss)])
        self.kind, self.mask = "nearopt", None
        if at.sum() >= 4 and len(np.unique(x[at])) >= 3:
            self.kind, self.mask = "quadratic-lr", at
            if not np.isfinite(self._vertex(loss[None])).all():
                self.kind, self.mask = "nearopt", None

    def _vertex(self, losses):
        m = self.mask
        z = np.log(losses[:, m])
        if self.kind == "quadratic":
            xm, ym = self.x[m].mean(), self.y[m].mean()
            return _quadratic_vertices(self.x[m] - xm, self.y[m] - ym, z) + [xm, ym]
        xm = self.x[m].mean()
        v = _quadratic_vertices(self.x[m] - xm, None, z) + xm
        return np.column_stack([v[:, 0], np.full(len(v), self.y[m][0])])

    def centroids(self, losses):
        """(K, 2) nearopt centroids in (log lr, log B) of (K, m) losses."""
        near = losses <= losses.min(axis=1, keepdims=True) * (1 + self.tolerance)
        return np.column_stack([near @ self.x, near @ self.y]) / near.sum(axis=1, keepdims=True)

    def optimum(self, losses):
        """(K, 2) optima of (K, m) losses; a redraw whose quadratic degenerates falls back to its centroid."""
        cent = self.centroids(losses)
        if self.kind == "nearopt":
            return cent
        v = self._vertex(losses)
        bad = ~np.isfinite(v).all(axis=1)
        v[bad] = cent[bad]
        return v

    def variance(self, losses, sigma: float, seeds, rng) -> np.ndarray:
        """Variance (2,) of the optimum's (log lr, log B) over noisy redraws, plus the grid's quantisation:
        a step^2/12 for a grid optimum, a further step^2 when it sits on the edge of what was swept."""
        eps = rng.standard_normal((UNCERTAINTY_DRAWS, len(losses)))
        draws = self.optimum(losses * (1 + sigma / np.sqrt(seeds) * eps))
        var = draws.var(axis=0, ddof=1)
        best = np.argmin(losses)
        for j, axis in enumerate((self.x, self.y)):
            values = np.unique(axis)
            if len(values) < 2:
                var[j] += _UNSWEPT_VAR
            elif self.kind == "nearopt" or (self.kind == "quadratic-lr" and j == 1):
                step = float(np.median(np.diff(values)))
                var[j] += step**2 / 12 + (step**2 if axis[best] in (values[0], values[-1]) else 0.0)
        return var


def _optima(cells: Cells, method: str, tolerance: float, window: float):
    """Per cell: its rule, its optimum (log lr, log B), and the optimum rows for `cell_optima`."""
    rules, points, rows = [], np.zeros((len(cells), 2)), []
    for i, s in enumerate(cells.slices):
        rule = _CellRule(cells.log_lr[s], cells.log_b[s], cells.loss[s], method, tolerance, window)
        rules.append(rule)
        n, d = cells.keys.iloc[i]
        points[i] = rule.optimum(cells.loss[s][None])[0]
        if rule.kind != "nearopt":
            rows.append((n, d, *np.exp(points[i]), cells.best[i], rule.kind))
            continue
        near = np.flatnonzero(cells.loss[s] <= cells.best[i] * (1 + tolerance)) + s.start
        rows += [(n, d, cells.lr[j], cells.batch[j], cells.best[i], "nearopt") for j in near]
    return rules, points, pd.DataFrame(rows, columns=[*_CELL, "lr", "batch_tokens", "best_loss", "method"])


def cell_optima(
    df: pd.DataFrame, tolerance: float = 0.0025, method: str = "nearopt", smooth_window: float = 0.05
) -> pd.DataFrame:
    """One row per optimum point: n_params, tokens, lr, batch_tokens, best_loss, method.

    Losses are averaged over seeds per configuration. "nearopt" gives every configuration within
    `tolerance` of the cell's best loss (several rows per cell); "smooth" gives one quadratic vertex per
    cell, falling back to "nearopt" where the quadratic is degenerate (too few distinct values, not convex,
    or its vertex outside the sampled grid).
    """
    if method not in ("nearopt", "smooth"):
        raise UserError(f"cell optima are nearopt or smooth, got {method!r}")
    _check_tolerance(tolerance)
    return _optima(Cells(check_cells(df)), method, tolerance, smooth_window)[2]


def _check_tolerance(tolerance: float) -> None:
    if not tolerance >= 0:
        raise UserError(f"--tolerance must be >= 0, got {tolerance}")


def between_cell_variance(x: np.ndarray, y: np.ndarray, var: np.ndarray) -> float:
    """Paule-Mandel tau^2: the extra variance that makes the weighted residual chi^2 of y on x equal its
    degrees of freedom (0 when the per-cell variances already explain the scatter)."""
    dof = len(y) - x.shape[1]
    if dof <= 0:
        return 0.0

    def chi2(tau2):
        w = 1 / (var + tau2)
        beta = np.linalg.lstsq(x * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
        return float(np.sum(w * (y - x @ beta) ** 2))

    if chi2(0.0) <= dof:
        return 0.0
    lo, hi = 0.0, max(float(np.var(y)), 1e-12)
    while chi2(hi) > dof and hi < 1e6:
        lo, hi = hi, hi * 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2(mid) > dof else (lo, mid)
    return hi


class _CellRegression:
    """Weighted least squares of per-cell log(target) on log N / log D, with cells the unit of resampling,
    and an optional Gaussian prior on the exponents (a MAP estimate: ridge toward the prior mean).

    Per-cell sums of w x x^T and w x y mean a fit for any cell weighting (bootstrap counts, leave-one-out
    zeros) is a 3x3 solve; inputs are centred so the solve is well conditioned.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, w: np.ndarray, prior=None):
        self.center = x.mean(axis=0)
        self.center[0] = 0.0
        xc = x - self.center
        self.xtx = w[:, None, None] * xc[:, :, None] * xc[:, None, :]
        self.xty = w[:, None] * xc * y[:, None]
        k = x.shape[1]
        self.prec, self.prec_mean = np.zeros(k), np.zeros(k)
        if prior is not None:  # (mean, sd) of the exponents; the intercept stays free
            self.prec[1:] = 1 / np.asarray(prior[1], float) ** 2
            self.prec_mean[1:] = self.prec[1:] * np.asarray(prior[0], float)

    def solve(self, weights: np.ndarray) -> np.ndarray:
        """Coefficients [log prefactor, exponents...] per row of cell weights; NaN rows where degenerate."""
        weights = np.asarray(weights, float).reshape(-1, len(self.xtx))
        xtx = np.einsum("sc,cij->sij", weights, self.xtx) + np.diag(self.prec)
        xty = np.einsum("sc,ci->si", weights, self.xty) + self.prec_mean
        if not len(weights):
            return xty
        eig = np.linalg.eigvalsh(xtx)
        ok = (eig[:, 0] > 1e-9 * np.maximum(eig[:, -1], 1e-300)) & (weights.sum(axis=1) > 0)
        coef = np.full(xty.shape, np.nan)
        if ok.any():
            coef[ok] = np.linalg.solve(xtx[ok], xty[ok][..., None])[..., 0]
        coef[:, 0] -= coef @ self.center  # back to uncentred log N, log D
        return coef


class _LinearEstimator:
    """nearopt / smooth / prior: per-cell optima with inverse-variance weights, then one linear solve."""

    def __init__(self, inputs: dict, feats: dict, points, variance, prior=None):
        self.regs, self.tau2, self.weights = {}, {}, {}
        for j, (target, x) in enumerate(feats.items()):
            self.tau2[target] = between_cell_variance(x, points[:, j], variance[:, j])
            self.weights[target] = 1 / (variance[:, j] + self.tau2[target])
            exps = None
            if prior is not None:
                names = [_NAMES[target][1][i] for i in inputs[target]]
                exps = ([prior["mean"][n] for n in names], [prior["sd"][n] for n in names])
            self.regs[target] = _CellRegression(x, points[:, j], self.weights[target], exps)

    def solve(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        return {t: r.solve(weights) for t, r in self.regs.items()}


def _law_dict(target, inputs, coef, samples, optima: pd.DataFrame) -> dict:
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
    y = np.log(optima[target].to_numpy(float))
    resid = y - features(inputs, optima["n_params"], optima["tokens"]) @ coef
    total = np.sum((y - y.mean()) ** 2)
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
        "points": int(len(y)),
        "cells": int(optima[_CELL].drop_duplicates().shape[0]),
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


def summarize_regret(rows: list[dict]) -> dict:
    """mean / median / max of the `regret` of rows (None when there are none)."""
    regret = np.array([r["regret"] for r in rows])
    if not len(rows):
        return {"mean": None, "median": None, "max": None}
    return {"mean": float(regret.mean()), "median": float(np.median(regret)), "max": float(regret.max())}


def _loo_regret(cells: Cells, estimator, batch_law: str, noise: dict) -> dict:
    """Leave-one-cell-out: refit without a cell, predict it, and charge the loss of its nearest sweep run."""
    coefs = estimator.solve(1.0 - np.eye(len(cells)))
    rows, skipped = [], 0
    for i, (n, d) in enumerate(cells.keys.itertuples(index=False)):
        if any(not np.isfinite(c[i]).all() for c in coefs.values()):
            skipped += 1
            continue
        pred = [features(law_inputs(t, batch_law), n, d) @ coefs[t][i] for t in TARGETS]
        rows.append(cells.regret_row(i, *pred))
    return {
        "method": "leave-one-cell-out, refitting the chosen estimator; regret = seed-mean loss of the cell's "
        "configuration nearest (in log lr, log B) to the prediction / cell best seed-mean loss - 1",
        **summarize_regret(rows),
        "noise_floor": noise.get("relative"),
        "cells_evaluated": len(rows),
        "cells_skipped": skipped,
        "per_cell": rows,
    }


def _solve_rows(estimator, weights: np.ndarray, progress=None, chunk: int = 256) -> dict[str, np.ndarray]:
    """`estimator.solve(weights)`, `chunk` rows at a time when `progress(done, total)` wants to hear after
    each: rows are solved independently, so the numbers are those of one call."""
    if progress is None or not len(weights):
        return estimator.solve(weights)
    parts = []
    for lo in range(0, len(weights), chunk):
        parts.append(estimator.solve(weights[lo : lo + chunk]))
        progress(min(lo + chunk, len(weights)), len(weights))
    return {t: np.concatenate([p[t] for p in parts]) for t in parts[0]}


def fit_hparam_laws(
    df: pd.DataFrame,
    tolerance: float = 0.0025,
    method: str = DEFAULT_METHOD,
    batch_law: str = "ND",
    bootstrap: int = 1000,
    seed: int = 0,
    smooth_window: float = 0.05,
    prior: str | dict | None = None,
    loo: bool = True,
    progress=None,
) -> dict:
    """Fit lr*(N, D) and B*(N, D) (or B*(D)) with bootstrap CIs and leave-one-cell-out regret.

    `method` is one of ESTIMATORS; `prior` (for "prior" only) is a JSON text, file or dict (`prior.py`).
    `progress(done, total)`, if given, is called as the bootstrap resamples are solved (a progress bar).
    Returns a JSON-ready dict: `laws` {"lr", "batch_tokens"}, `regret`, `cell_optima`, `method`, `noise`.
    """
    if method not in ESTIMATORS:
        raise UserError(f"--method must be one of {', '.join(ESTIMATORS)}, got {method!r}")
    if prior is not None and method != "prior":
        raise UserError(f"--prior applies to --method prior only (the method is {method})")
    _check_tolerance(tolerance)
    inputs = {t: law_inputs(t, batch_law) for t in TARGETS}
    cells = Cells(check_cells(df))
    noise = noise_floor(df)
    sigma, sigma_source = weighting_noise(noise, cells)
    rules, points, optima = _optima(cells, "smooth" if method == "smooth" else "nearopt", tolerance, smooth_window)
    rng = np.random.default_rng(seed)
    n_cells = len(cells)
    draws = rng.integers(0, n_cells, (max(int(bootstrap), 0), n_cells))
    noise_rng = np.random.default_rng([seed, 1])
    variance = np.array(
        [r.variance(cells.loss[s], sigma, cells.seeds[s], noise_rng) for r, s in zip(rules, cells.slices, strict=True)]
    )
    prior_spec = parse_prior(prior) if method == "prior" else None
    feats = {t: features(inputs[t], cells.keys["n_params"], cells.keys["tokens"]) for t in TARGETS}
    linear = _LinearEstimator(inputs, feats, points, variance, prior_spec)
    estimator, extra = linear, {}
    if method == "surface":
        surface = SurfaceEstimator(cells, feats, linear.solve(np.ones(n_cells)))
        extra = {"surface": surface.info}
        estimator = linear if surface.fallback is not None else surface
    weights = np.zeros((len(draws), n_cells))
    np.add.at(weights, (np.arange(len(draws))[:, None], draws), 1.0)
    full = estimator.solve(np.ones(n_cells))
    samples = _solve_rows(estimator, weights, progress)
    laws = {t: _law_dict(t, inputs[t], full[t][0], samples[t], optima) for t in TARGETS}
    per_cell = []
    for i, ((n, d), group) in enumerate(optima.groupby(_CELL, sort=True)):
        per_cell.append(
            {
                "n_params": float(n),
                "tokens": float(d),
                "best_loss": float(group["best_loss"].iloc[0]),
                "method": group["method"].iloc[0],
                "optima": group[["lr", "batch_tokens"]].to_numpy(float).tolist(),
                "sd_log_lr": float(np.sqrt(variance[i, 0])),
                "sd_log_batch": float(np.sqrt(variance[i, 1])),
                "weight_lr": float(linear.weights["lr"][i] / linear.weights["lr"].sum()),
                "weight_batch": float(linear.weights["batch_tokens"][i] / linear.weights["batch_tokens"].sum()),
            }
        )
    return {
        "method": {
            "optimum": method,
            "estimator": method,
            "tolerance": tolerance,
            "smooth_window": smooth_window if method == "smooth" else None,
            "surface_window": SURFACE_WINDOW if method == "surface" else None,
            "batch_law": batch_law,
            "bootstrap": int(bootstrap),
            "seed": seed,
            "ci_level": CI_LEVEL,
            "cells_by_method": optima.drop_duplicates(_CELL)["method"].value_counts().to_dict(),
            "prior": prior_spec,
            "weights": {
                "rule": "inverse variance of each cell's optimum: its spread over noisy redraws of the cell's "
                "runs + grid quantisation (step^2/12, + step^2 on the grid's edge) + between-cell tau^2",
                "noise": sigma,
                "noise_source": sigma_source,
                "tau2_log_lr": linear.tau2["lr"],
                "tau2_log_batch": linear.tau2["batch_tokens"],
            },
            **extra,
        },
        "laws": laws,
        "regret": _loo_regret(cells, estimator, batch_law, noise) if loo else None,
        "cell_optima": per_cell,
        "noise": noise,
    }
