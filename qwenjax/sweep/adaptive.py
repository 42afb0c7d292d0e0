"""Adaptive grids: centre each (N, D) cell's lr and batch grids on a prior, and extend a cell whose optimum
sits on the edge of its grid.

Why: a fixed lr range wide enough for every cell of a ladder wastes most runs (the optimum moves by ~10x
across N), and one that is too narrow gives an optimum that is only a bound, which biases the fitted law.
Centring on the Step Law (lr = 1.79 N^-0.713 D^0.307, B = 0.58 D^0.571 tokens) or on an earlier fit puts
the grid where the optimum should be; extension repairs the cells where it is not.

Grid values are snapped to the lattice 2^(k / per_octave) so that cells share values and a rerun of the same
spec produces the same run ids.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from qwenjax.errors import UserError
from qwenjax.hparams import batch_sequences
from qwenjax.scaling.fitfile import load_fit
from qwenjax.scaling.predict import predict
from qwenjax.scaling.prior import STEP_LAW as _STEP
from qwenjax.scaling.prior import STEP_LAW_COEF
from qwenjax.sweep.results import row_loss
from qwenjax.sweep.spec import Grid, resolve_relative

#: Step Law (Li et al. 2025) as (coefficient, N exponent, D exponent) per target: the prior's numbers
STEP_LAW = {
    "lr": (STEP_LAW_COEF["a"], _STEP["alpha"], _STEP["beta"]),
    "batch_tokens": (STEP_LAW_COEF["b"], _STEP["gamma"], _STEP["delta"]),
}


def step_law(n_params: float, tokens: float) -> tuple[float, float]:
    """(lr, batch_tokens) of the Step Law prior."""
    a, b, c = STEP_LAW["lr"]
    lr = a * n_params**b * tokens**c
    a, b, c = STEP_LAW["batch_tokens"]
    return lr, a * n_params**b * tokens**c


class Prior:
    """Where the optimum of a cell should be: the Step Law ("prior") or a FIT.json via qwenjax.scaling."""

    def __init__(self, source: str, spec_path: Path | None = None):
        self.source = source
        self._fit = None
        if source != "prior":
            path = resolve_relative(source, spec_path)
            if not path.is_file():
                raise UserError(f"around: {source!r} is neither 'prior' nor an existing FIT.json")
            self._fit = load_fit(path)

    def __call__(self, n_params: float, tokens: float) -> tuple[float, float]:
        if self._fit is None:
            return step_law(n_params, tokens)
        p = predict(self._fit, n_params, tokens)
        return float(p["lr"]), float(p["batch_tokens"])


def _snap(x: float, per_octave: int) -> int:
    return round(math.log2(x) * per_octave)


def lr_values(grid: Grid, prior: Prior | None, n_params: float, tokens: float) -> list[float]:
    """The initial lr grid of a cell."""
    if not grid.adaptive:
        return list(grid.values)
    centre = _snap(prior(n_params, tokens)[0], grid.per_octave)
    half = round(grid.span_octaves * grid.per_octave)
    return [2.0 ** (k / grid.per_octave) for k in range(centre - half, centre + half + 1)]


def batch_values(grid: Grid, prior: Prior | None, n_params: float, tokens: float, seq_len: int) -> list[int]:
    """The initial batch grid of a cell (sequences); adaptive grids drop batches larger than the budget."""
    if not grid.adaptive:
        return [int(v) for v in grid.values]
    seqs = batch_sequences(prior(n_params, tokens)[1], seq_len, exact=True)  # snapped to the lattice below
    centre = _snap(max(seqs, 1.0), grid.per_octave)
    half = round(grid.span_octaves * grid.per_octave)
    values = {max(1, round(2.0 ** (k / grid.per_octave))) for k in range(centre - half, centre + half + 1)}
    return sorted(v for v in values if v * seq_len <= tokens)


def lr_step(grid: Grid) -> float:
    """The factor between neighbouring lrs: 2^(1/per_octave), or the finest spacing of an explicit list."""
    if grid.kind != "list" or len(grid.values) < 2:
        return 2.0 ** (1.0 / grid.per_octave)
    return min(b / a for a, b in zip(grid.values, grid.values[1:], strict=False))  # the finest spacing


def _key(x: float) -> float:
    return float(f"{x:.6g}")


def point_losses(rows: list[dict]) -> dict[tuple[float, int], float]:
    """(lr, batch_size) -> mean loss over the point's seeds (inf if any of them failed or diverged)."""
    by_point: dict[tuple[float, int], list[float]] = defaultdict(list)
    for r in rows:
        by_point[(_key(r["lr"]), int(r["batch_size"]))].append(row_loss(r))
    return {p: (sum(v) / len(v) if all(math.isfinite(x) for x in v) else math.inf) for p, v in by_point.items()}


def best_point(rows: list[dict]) -> tuple[float, int] | None:
    """The (lr, batch_size) with the lowest mean loss over its seeds; None if no run of the cell succeeded."""
    finite = {p: v for p, v in point_losses(rows).items() if math.isfinite(v)}
    return min(finite, key=finite.get) if finite else None


def extension_points(rows: list[dict], lr_factor: float | None, batch_factor: float | None = 2.0,
                     per_side: int = 2, margin: float = 0.0) -> list[tuple[float, int]]:
    """New (lr, batch_size) points for a cell whose best run sits on an edge of the grid it has so far.

    `rows`: result lines of the cell (all seeds; a point's loss is the mean over its seeds). An axis with
    factor None (a single value was asked for) is never extended.
    - best lr is the largest (smallest) tried at the best batch -> `per_side` lrs above (below) it there;
    - best batch is the largest (smallest) tried -> the next batch beyond it, at the best lr and one step
      either side;
    - no run of the cell succeeded (every lr diverged) -> `per_side` lrs below the smallest, at every batch;
    - `margin` > 0: the smallest (largest) lr tried at the best batch is less than `margin` worse than the best
      -> one more lr below (above) it, so the landscape is seen to bend by at least that much.
    Points already tried are not proposed again; an empty list means the optimum is bracketed.
    """
    mean = point_losses(rows)
    if not mean:
        return []
    tried = set(mean)
    new: list[tuple[float, int]] = []

    def propose(lr: float, batch: int) -> None:
        p = (_key(lr), int(batch))
        if batch >= 1 and p not in tried and p not in new:
            new.append(p)

    finite = {p: v for p, v in mean.items() if math.isfinite(v)}
    if not finite:
        if lr_factor:
            for batch in sorted({b for _, b in tried}):
                low = min(lr for lr, b in tried if b == batch)
                for j in range(1, per_side + 1):
                    propose(low / lr_factor**j, batch)
        return new
    best_lr, best_b = min(finite, key=finite.get)
    if lr_factor:
        lrs_at_b = sorted(lr for lr, b in tried if b == best_b)
        if best_lr >= lrs_at_b[-1]:
            for j in range(1, per_side + 1):
                propose(best_lr * lr_factor**j, best_b)
        elif best_lr <= lrs_at_b[0]:
            for j in range(1, per_side + 1):
                propose(best_lr / lr_factor**j, best_b)
        else:
            best = finite[(best_lr, best_b)]
            for edge, factor in ((lrs_at_b[0], 1 / lr_factor), (lrs_at_b[-1], lr_factor)):
                if mean[(edge, best_b)] < best * (1 + margin):
                    propose(edge * factor, best_b)
    if batch_factor:
        batches = sorted({b for _, b in tried})
        target = None
        if best_b >= batches[-1]:
            target = round(best_b * batch_factor)
        elif best_b <= batches[0] and best_b > 1:
            target = max(1, round(best_b / batch_factor))
        if target is not None:
            step = lr_factor or 1.0
            for lr in sorted({best_lr / step, best_lr, best_lr * step}):
                propose(lr, target)
    return new
