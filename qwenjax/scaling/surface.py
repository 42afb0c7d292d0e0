"""The `surface` estimator: one joint fit of every run near each cell's optimum to a loss surface.

    log L = log L*_c + 1/2 h_uu u^2 + h_uv u v + 1/2 h_vv v^2 + s_u u^3 + s_v v^3,
    u = log lr - log lr*(N, D),  v = log B - log B*(N, D),
    log lr* = log a + alpha log N + beta log D,   log B* = log b + gamma log N + delta log D

with L*_c free per cell, the curvature (h) and skew (s, so that steeper walls on one side do not drag the
centre) shared by all cells. Why: the nearopt and smooth rules throw away what the runs away from the
optimum say about where it is, and locate each cell on its own; here every run pulls on the laws directly
and a cell with a flat or noisy landscape pulls less. Runs more than SURFACE_WINDOW above their cell's best
(far up the walls, where the bowl is no longer quadratic) and diverged runs are left out. Losses are seed
means, weighted by their seed count.

The free L*_c are eliminated exactly (variable projection: residuals are taken about each cell's weighted
mean), leaving about 11 parameters. The full fit is scipy's least_squares from the nearopt fit; bootstrap
and leave-one-out refits are a Levenberg-Marquardt batched over all resamples at once, started at the full fit.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares

from qwenjax.scaling.cells import Cells

#: Runs within this relative loss of their cell's best enter the surface fit.
SURFACE_WINDOW = 0.10
_CHUNK = 256


class SurfaceEstimator:
    """Fits the surface on `cells`; `solve(weights)` refits for rows of cell weights, like the linear ones.

    `feats` maps each target to its uncentred per-cell design rows (C, k); `start` to (1, k) coefficients
    from the nearopt fit, where the least-squares fit starts.
    """

    def __init__(self, cells: Cells, feats: dict, start: dict, window: float = SURFACE_WINDOW, skew: bool = True):
        keep = cells.loss <= cells.best[cells.cell] * (1 + window)
        self.targets = tuple(feats)
        self.ci = cells.cell[keep]
        self.x, self.y = cells.log_lr[keep], cells.log_b[keep]
        self.z, self.omega = np.log(cells.loss[keep]), cells.seeds[keep]
        n_cells = len(cells)
        self.n_cells = n_cells
        # configurations are sorted by cell and each cell keeps at least its best: contiguous, non-empty runs
        self.starts = np.searchsorted(self.ci, np.arange(n_cells))
        self.omega_sum = np.add.reduceat(self.omega, self.starts)
        self.center, self.feats = {}, {}
        for t, f in feats.items():
            c = f.mean(axis=0)
            c[0] = 0.0
            self.center[t], self.feats[t] = c, f - c
        self.k = [self.feats[t].shape[1] for t in self.targets]
        self.skew = skew
        self.p = sum(self.k) + 3 + (2 if skew else 0)
        theta0 = [start[t][0].copy() for t in self.targets]
        for t, th in zip(self.targets, theta0, strict=True):
            th[0] += th[1:] @ self.center[t][1:]
        self.info = {"window": window, "skew": skew, "runs": int(len(self.z)), "cells": n_cells}
        phi0 = np.concatenate([*theta0, self._shape_start(np.concatenate(theta0))])
        sw = np.sqrt(self.omega)
        res = least_squares(
            lambda phi: sw * self._residual(phi[None])[0][0],
            phi0,
            jac=lambda phi: sw[:, None] * self._residual(phi[None], jac=True)[1][0],
            method="trf",
            x_scale="jac",
            ftol=1e-12,
            xtol=1e-12,
            gtol=1e-12,
            max_nfev=500,
        )
        self.phi = res.x
        ok = self._valid(res.x[None], np.ones((1, n_cells)))[0]
        h, s = self._shape(res.x[None])
        resid = self._residual(res.x[None])[0][0]
        self.info.update(
            converged=bool(res.success),
            curvature={"h_uu": float(h[0, 0]), "h_uv": float(h[0, 1]), "h_vv": float(h[0, 2])},
            skew_terms={"s_u": float(s[0, 0]), "s_v": float(s[0, 1])} if skew else None,
            rmse_log=float(np.sqrt(np.sum(self.omega * resid**2) / np.sum(self.omega))),
        )
        self.fallback = None
        if not ok:
            self.fallback = start
            self.info["fallback"] = "the fitted bowl is not convex or the laws are not identified; nearopt laws used"

    # --- model ---------------------------------------------------------------------------------------------

    def _split(self, phi):
        k1, k2 = self.k
        return phi[:, :k1], phi[:, k1 : k1 + k2], phi[:, k1 + k2 :]

    def _shape(self, phi):
        rest = self._split(phi)[2]
        return rest[:, :3], (rest[:, 3:5] if self.skew else np.zeros((len(phi), 2)))

    def _uv(self, theta):
        th1, th2 = theta
        f1, f2 = (self.feats[t] for t in self.targets)
        return self.x - (th1 @ f1.T)[:, self.ci], self.y - (th2 @ f2.T)[:, self.ci]

    def _shape_start(self, theta):
        """Curvature and skew by linear least squares with the centres fixed at the nearopt laws."""
        k1 = self.k[0]
        u, v = self._uv((theta[None, :k1], theta[None, k1:]))
        cols = [0.5 * u**2, u * v, 0.5 * v**2] + ([u**3, v**3] if self.skew else [])
        a = self._project(np.stack(cols, axis=-1))[0]
        z = self._project(self.z[None])[0]
        sw = np.sqrt(self.omega)
        coef = np.linalg.lstsq(a * sw[:, None], z * sw, rcond=None)[0]
        if not (coef[0] > 0 and coef[0] * coef[2] > coef[1] ** 2):
            coef[:3] = [0.04, 0.0, 0.02]
        return coef

    def _project(self, a):
        """a minus its seed-weighted mean over each cell's runs (axis 1), which eliminates the free L*_c."""
        tail = (1,) * (a.ndim - 2)
        sums = np.add.reduceat(a * self.omega.reshape(1, -1, *tail), self.starts, axis=1)
        return a - (sums / self.omega_sum.reshape(1, -1, *tail))[:, self.ci]

    def _residual(self, phi, jac: bool = False):
        """Projected residuals (S, R) of observed minus modelled log loss and, with jac, their Jacobian."""
        th1, th2, _ = self._split(phi)
        (h, s) = self._shape(phi)
        u, v = self._uv((th1, th2))
        huu, huv, hvv = (h[:, i : i + 1] for i in range(3))
        su, sv = s[:, :1], s[:, 1:]
        f = 0.5 * huu * u**2 + huv * u * v + 0.5 * hvv * v**2 + su * u**3 + sv * v**3
        r = self._project(self.z[None] - f)
        if not jac:
            return r, None
        dfu = self._project(huu * u + huv * v + 3 * su * u**2)
        dfv = self._project(huv * u + hvv * v + 3 * sv * v**2)
        f1, f2 = (self.feats[t][self.ci] for t in self.targets)  # constant within a cell: commutes with projection
        shape = [0.5 * u**2, u * v, 0.5 * v**2] + ([u**3, v**3] if self.skew else [])
        return r, np.concatenate(
            [dfu[..., None] * f1, dfv[..., None] * f2, -self._project(np.stack(shape, axis=-1))], axis=-1
        )

    def _valid(self, phi, weights):
        """Rows with a convex bowl and laws identified by the weighted cells."""
        h = self._shape(phi)[0]
        ok = (h[:, 0] > 0) & (h[:, 0] * h[:, 2] > h[:, 1] ** 2) & np.isfinite(phi).all(axis=1)
        for t in self.targets:
            f = self.feats[t]
            xtx = np.einsum("sc,ci,cj->sij", weights, f, f)
            eig = np.linalg.eigvalsh(xtx)
            ok &= eig[:, 0] > 1e-9 * np.maximum(eig[:, -1], 1e-300)
        return ok

    # --- refits --------------------------------------------------------------------------------------------

    def _lm(self, weights, phi, iters: int = 40):
        """Levenberg-Marquardt for every row of cell weights at once, from the rows of phi."""
        w_runs = weights[:, self.ci] * self.omega
        lam = np.full(len(phi), 1e-3)
        active = np.ones(len(phi), bool)
        r, jac = self._residual(phi, jac=True)
        cost = np.sum(w_runs * r**2, axis=1)
        for _ in range(iters):
            idx = np.flatnonzero(active)
            if not len(idx):
                break
            wj = (jac[idx] * w_runs[idx, :, None]).transpose(0, 2, 1)
            a = wj @ jac[idx]
            g = (wj @ r[idx][..., None])[..., 0]
            diag = np.einsum("spp->sp", a) + 1e-12
            step = np.linalg.solve(a + lam[idx, None, None] * np.eye(self.p) * diag[:, :, None], -g[..., None])
            trial = phi[idx] + step[..., 0]
            r_t = self._residual(trial)[0]
            cost_t = np.sum(w_runs[idx] * r_t**2, axis=1)
            better = cost_t < cost[idx]
            acc = idx[better]
            gain = (cost[acc] - cost_t[better]) / np.maximum(cost[acc], 1e-300)
            phi[acc], cost[acc] = trial[better], cost_t[better]
            if len(acc):
                r[acc], jac[acc] = self._residual(phi[acc], jac=True)
            lam[idx] = np.where(better, lam[idx] / 3, lam[idx] * 4)
            active[acc[gain < 1e-10]] = False
            active[idx[~better & (lam[idx] > 1e8)]] = False
        return phi

    def solve(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Uncentred law coefficients per target for rows of cell weights; NaN rows where degenerate."""
        weights = np.asarray(weights, float).reshape(-1, self.n_cells)
        if self.fallback is not None:
            raise RuntimeError("surface fit fell back; use the linear estimator")
        out = np.full((len(weights), self.p), np.nan)
        full = (weights == 1).all(axis=1)
        out[full] = self.phi
        for lo in range(0, len(weights), _CHUNK):
            rows = np.arange(lo, min(lo + _CHUNK, len(weights)))
            rows = rows[~full[rows]]
            if len(rows):
                out[rows] = self._lm(weights[rows], np.tile(self.phi, (len(rows), 1)))
        out[~self._valid(out, weights)] = np.nan
        th = self._split(out)[:2]
        coefs = {}
        for t, theta in zip(self.targets, th, strict=True):
            theta = theta.copy()
            theta[:, 0] -= theta[:, 1:] @ self.center[t][1:]
            coefs[t] = theta
        return coefs
