"""PNG plots of sweeps and fits, drawn on bare matplotlib Figures (Agg canvas, no pyplot global state).

Each `plot_*` returns its Figure and, given `path`, also writes it as PNG, so the CLI saves files and a
notebook can display the same figures. Axes are sized by what is worth reading, not by every artist:
diverged runs are pinned to a panel's edge (red markers, `gid="diverged"`), intervals reaching far beyond
their points are cut at the edge with an arrow (`gid="clipped"`), and log-axis ticks are thinned until
their labels do not overlap (`_declutter`, measured with the Agg renderer).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, Locator, LogLocator, NullFormatter

from qwenjax.scaling.cells import config_table
from qwenjax.scaling.hparams import evaluate_law
from qwenjax.scaling.loss_law import evaluate_loss_law, loss_points
from qwenjax.scaling.predict import QWEN25_TOKENS, predict
from qwenjax.scaling.units import format_count

_CELL = ["n_params", "tokens"]
_SPAN = 30.0  # an interval may reach this factor beyond its points before it is cut at the edge
_MAX_TICKS = 8
DPI = 110


def _figure(rows: int = 1, cols: int = 1, size=(5.0, 3.8)):
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path, dpi: int = DPI) -> Figure:
    _declutter(fig)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def _colors(n: int):
    return colormaps["viridis"](np.linspace(0.05, 0.9, max(n, 1)))


def _number(v: float) -> str:
    """0.005, 20, 1e-05 -> '1e-5': short labels for lrs and ratios."""
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    mantissa, exponent = f"{v:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _count(v: float) -> str:
    """Counts (N, D, FLOPs): 500, 4k, 1M, 100B."""
    return format_count(v) if v >= 1 else _number(v)


def _power_of_two(v: float) -> str:
    """Batch sizes on a base-2 axis: 256, 1024, 2048 exactly (a rounded '1.02k' reads as another size)."""
    return f"{v:.0f}" if v < 1e5 else format_count(v)


class _LogTicks(Locator):
    """Major ticks of a log axis at round values (1-2-5 per decade, or powers of two for batch sizes);
    `level` steps to sparser sets when `_declutter` finds the labels overlapping."""

    def __init__(self, base2: bool = False):
        self.base2, self.level = base2, 0

    def __call__(self):
        return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin, vmax):
        lo, hi = sorted((vmin, vmax))
        lo = lo if lo > 0 else hi / 1e3
        sets = self._sets(lo, hi)
        start = next((i for i, t in enumerate(sets) if len(t) <= _MAX_TICKS), len(sets) - 1)
        return sets[min(start + self.level, len(sets) - 1)]

    def _sets(self, lo, hi):
        """Candidate tick sets inside [lo, hi], densest first, each with at least two ticks if any has."""
        if self.base2:
            k = np.arange(math.ceil(math.log2(lo) - 1e-9), math.floor(math.log2(hi) + 1e-9) + 1)
            sets = [2.0 ** k[(k % stride) == 0] for stride in (1, 2, 3, 4, 5, 6, 8, 10, 16)]
        else:
            decades = np.arange(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            mantissas = ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5), (1, 2, 5), (1, 3), (1,))
            sets = [np.array([s * 10.0**e for e in decades for s in subs]) for subs in mantissas]
            sets += [10.0 ** decades[(decades % stride) == 0] for stride in (2, 3, 4, 5, 10, 20)]
        sets = [t[(t >= lo * (1 - 1e-9)) & (t <= hi * (1 + 1e-9))] for t in sets]
        if not self.base2 and len(sets[2]) >= 2:
            sets = sets[2:]  # 1-2-5 reads best; the denser sets are for spans too narrow to hold two of them
        readable = [t for t in sets if len(t) >= 2]
        return readable or [sets[0]]


def _log_axis(ax, which: str, kind: str = "number") -> None:
    """Log scale with `_LogTicks` and compact labels; `kind` is 'number', 'count' or 'base2' (a count)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(_LogTicks(base2=kind == "base2"))
    label = {"number": _number, "count": _count, "base2": _power_of_two}[kind]
    axis.set_major_formatter(FuncFormatter(lambda v, _: label(v)))
    axis.set_minor_locator(LogLocator(subs=tuple(range(2, 10)), numticks=100))
    axis.set_minor_formatter(NullFormatter())


def _overlaps(labels, renderer, gap: float = 3.0) -> bool:
    """Whether any two visible labels come closer than `gap` pixels."""
    boxes = [t.get_window_extent(renderer).padded(gap / 2) for t in labels if t.get_visible() and t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _declutter(fig: Figure, rounds: int = 8) -> None:
    """Draw, and thin the ticks of every `_LogTicks` axis whose labels overlap, until none do."""
    for _ in range(rounds):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        crowded = [
            axis.get_major_locator()
            for ax in fig.axes
            for axis in (ax.xaxis, ax.yaxis)
            if isinstance(axis.get_major_locator(), _LogTicks) and _overlaps(axis.get_ticklabels(), renderer)
        ]
        if not crowded:
            return
        for locator in crowded:
            locator.level += 1


def _log_range(values, pad: float = 1.15):
    """(lo, hi) of the finite positive `values`, widened by `pad` (a factor) on each side of a log axis."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    lo, hi = (v.min(), v.max()) if len(v) else (0.1, 10.0)
    margin = max(pad, (hi / lo) ** 0.04)
    return lo / margin, hi * margin


def _interval_limits(points, lo, hi, span: float = _SPAN):
    """Log-axis limits covering `points` and their intervals, the intervals only up to `span`x beyond
    the points: (cut_lo, cut_hi) where intervals are cut, and the padded axis limits."""
    p = np.asarray(points, float)
    p = p[np.isfinite(p) & (p > 0)]
    ends = np.concatenate([np.ravel(lo), np.ravel(hi)]).astype(float)
    ends = ends[np.isfinite(ends) & (ends > 0)]
    cut_lo = max(min(p.min(), *ends) if len(ends) else p.min(), p.min() / span)
    cut_hi = min(max(p.max(), *ends) if len(ends) else p.max(), p.max() * span)
    return (cut_lo, cut_hi), _log_range([cut_lo, cut_hi], pad=1.25)


def _clipped_errorbars(ax, x, y, lo, hi, colors, cut, **style) -> None:
    """Error bars on a log y axis with ends beyond `cut` stopped there and marked with an arrow."""
    y, lo, hi = (np.asarray(a, float) for a in (y, lo, hi))
    lo_c, hi_c = np.clip(lo, *cut), np.clip(hi, *cut)
    err = np.nan_to_num(np.clip([y - lo_c, hi_c - y], 0, None))
    for i, color in enumerate(colors):
        bars = ax.errorbar(x[i], y[i], yerr=err[:, i : i + 1], fmt="o", color=color, **style)
        bars.lines[2][0].set_gid("interval")
        for end, edge, marker in ((hi[i], cut[1], "^"), (lo[i], cut[0], "v")):
            beyond = end > edge * (1 + 1e-9) if marker == "^" else end < edge * (1 - 1e-9)
            if np.isfinite(end) and beyond:
                ax.plot([x[i]], [edge], marker, color=color, ms=6, clip_on=False, gid="clipped")


def _pin_diverged(ax, xs) -> None:
    """Diverged or failed runs on the top edge: an x at their value inside the x range, a red arrow at the
    corner for those beyond it (so an lr of 4 does not squeeze the real grid into a corner)."""
    (x0, x1), top = ax.get_xlim(), ax.get_ylim()[1]
    xs = np.asarray(xs, float)
    for where, x_at, marker in ((xs > x1, x1, ">"), (xs < x0, x0, "<"), ((xs >= x0) & (xs <= x1), None, "x")):
        if where.any():
            px = xs[where] if x_at is None else np.full(where.sum(), x_at)
            ax.plot(px, np.full(len(px), top), marker, color="red", ms=5, clip_on=False, gid="diverged")


def _sweep_panels(df: pd.DataFrame, fit: dict, x: str, series: str, path, title: str) -> Figure:
    """A panel per (N, D) cell: loss against `x`, a line per `series` value; optimum and prediction marked."""
    ns, ds = np.sort(df["n_params"].unique()), np.sort(df["tokens"].unique())
    fig, axes = _figure(len(ns), len(ds), size=(3.4, 2.7))
    optima = {(c["n_params"], c["tokens"]): c for c in fit.get("cell_optima", [])}
    for i, n in enumerate(ns):
        for j, d in enumerate(ds):
            ax = axes[i, j]
            ax.set_title(f"N={format_count(n)} D={format_count(d)}", fontsize=8)
            runs = df[(df["n_params"] == n) & (df["tokens"] == d)]
            if runs.empty:
                ax.set_visible(False)
                continue
            _log_axis(ax, "x", "base2" if x == "batch_tokens" else "number")
            ok = config_table(runs)  # seed means
            values = np.sort(runs[series].unique())
            for color, value in zip(_colors(len(values)), values, strict=True):
                line = ok[ok[series] == value].sort_values(x)
                label = f"{format_count(value)}" if series == "batch_tokens" else f"{value:.2g}"
                ax.plot(line[x], line["loss"], "o-", ms=2.5, lw=0.8, color=color, label=label)
            shown = ok[x] if not ok.empty else runs[x]
            cell = optima.get((float(n), float(d)))
            if cell:
                opt = pd.DataFrame(cell["optima"], columns=["lr", "batch_tokens"])
                # a near-optimal run is starred at its own loss; a quadratic vertex at the cell's best loss
                runs_at = ok[["lr", "batch_tokens", "loss"]].astype(float)
                opt = opt.merge(runs_at, how="left").fillna({"loss": cell["best_loss"]})
                ax.plot(opt[x], opt["loss"], "*", color="crimson", ms=8, zorder=5)
                shown = np.concatenate([shown, opt[x]])
            ax.set_xlim(*_log_range(shown))
            if not ok.empty:
                best = ok["loss"].min()
                ax.set_ylim(best * 0.995, min(ok["loss"].max(), best * 1.15) * 1.005)
            if cell and fit.get("laws"):
                pred = float(evaluate_law(fit["laws"][x], n, d)[0])
                x0, x1 = ax.get_xlim()
                if x0 <= pred <= x1:
                    ax.axvline(pred, color="k", ls="--", lw=0.8)
                else:  # the law's prediction lies off the panel: an arrow at the bottom edge says which side
                    ax.plot(
                        [min(max(pred, x0), x1)],
                        [ax.get_ylim()[0]],
                        "<" if pred < x0 else ">",
                        color="k",
                        ms=6,
                        clip_on=False,
                        gid="clipped",
                    )
            bad = runs[~runs["valid"]]
            if len(bad):
                _pin_diverged(ax, bad[x])
            ax.tick_params(which="both", labelsize=7)
    axes[0, 0].legend(fontsize=6, title=series, title_fontsize=6)
    fig.suptitle(title + "  (* optimum, -- law prediction, red x / > diverged or failed)", fontsize=9)
    return _save(fig, path)


def plot_lr_sweeps(df: pd.DataFrame, fit: dict, path=None) -> Figure:
    """Loss against learning rate in every cell, one line per batch size."""
    return _sweep_panels(df, fit, "lr", "batch_tokens", path, "loss vs learning rate")


def plot_batch_sweeps(df: pd.DataFrame, fit: dict, path=None) -> Figure:
    """Loss against batch size (tokens) in every cell, one line per learning rate."""
    return _sweep_panels(df, fit, "batch_tokens", "lr", path, "loss vs batch size (tokens)")


def plot_hparam_laws(fit: dict, path=None) -> Figure:
    """lr* and B* against N (a line per D) and against D (a line per N): cell optima, power law, 95% band
    (cut at the axes when it reaches far beyond the points)."""
    fig, axes = _figure(2, 2)
    cells = fit["cell_optima"]
    ns = np.array(fit["data"]["n_params_values"])
    ds = np.array(fit["data"]["tokens_values"])
    for row, target in enumerate(("lr", "batch_tokens")):
        law = fit["laws"][target]
        for col, (axis, others) in enumerate((("n_params", ds), ("tokens", ns))):
            ax = axes[row, col]
            grid = np.geomspace(*(ns if axis == "n_params" else ds)[[0, -1]], 50)
            centre, bands = [], []
            for color, other in zip(_colors(len(others)), others, strict=True):
                n, d = (grid, other) if axis == "n_params" else (other, grid)
                value, (lo, hi) = evaluate_law(law, n, d)
                ax.plot(
                    grid, value, color=color, lw=1, label=("D=" if axis == "n_params" else "N=") + format_count(other)
                )
                ax.fill_between(grid, lo, hi, color=color, alpha=0.2, lw=0)
                centre.append(value)
                bands += [lo, hi]
                for c in cells:
                    if c["tokens" if axis == "n_params" else "n_params"] == other:
                        values = np.array(c["optima"])[:, row]
                        ax.plot(np.full(len(values), c[axis]), values, "o", color=color, ms=3)
                        centre.append(values)
            _log_axis(ax, "x", "count")
            _log_axis(ax, "y", "number" if target == "lr" else "count")
            ax.set_xlim(*_log_range(grid, pad=1.1))
            ax.set_ylim(*_interval_limits(np.concatenate(centre), bands[::2], bands[1::2], span=3.0)[1])
            ax.set_xlabel("N (non-embedding params)" if axis == "n_params" else "D (tokens)")
            ax.set_ylabel("optimal lr" if target == "lr" else "optimal batch (tokens)")
            ax.legend(fontsize=6)
        axes[row, 0].set_title(
            law["formula"] + "  " + ", ".join(f"{k}={v['value']:.3g}" for k, v in law["coef"].items()),
            fontsize=8,
        )
    return _save(fig, path)


def plot_loss_law(df: pd.DataFrame, fit: dict, path=None) -> Figure:
    """Per-cell best loss against N, a curve per D from the loss law with its 95% band; residuals beside."""
    law = fit["loss_law"]
    points = loss_points(df)
    fig, axes = _figure(1, 2)
    ax, res = axes[0]
    ds = np.sort(points["tokens"].unique())
    grid = np.geomspace(points["n_params"].min() / 1.5, points["n_params"].max() * 1.5, 60)
    centre = [points["loss"].to_numpy()]
    for color, d in zip(_colors(len(ds)), ds, strict=True):
        value, (lo, hi) = evaluate_loss_law(law, grid, d)
        ax.plot(grid, value, color=color, lw=1, label=f"D={format_count(d)}")
        ax.fill_between(grid, lo, hi, color=color, alpha=0.2, lw=0)
        centre.append(value)
        at = points[points["tokens"] == d]
        ax.plot(at["n_params"], at["loss"], "o", color=color, ms=3)
        res.plot(
            at["n_params"] * at["tokens"] * 6,
            at["loss"] / evaluate_loss_law(law, at["n_params"], d)[0] - 1,
            "o",
            color=color,
            ms=3,
        )
    low, high = np.nanmin(np.concatenate(centre)), np.nanmax(np.concatenate(centre))
    ax.set_ylim(low - 0.15 * (high - low), high + 0.15 * (high - low))  # a wild band is cut, not followed
    _log_axis(ax, "x", "count")
    ax.set_xlim(grid[0], grid[-1])
    ax.set(xlabel="N (non-embedding params)", ylabel="best loss in cell")
    ax.set_title(
        "L = E + A/N^alpha + B/D^beta  " + ", ".join(f"{k}={v['value']:.3g}" for k, v in law["coef"].items()),
        fontsize=8,
    )
    ax.legend(fontsize=6)
    res.axhline(0, color="k", lw=0.8)
    _log_axis(res, "x", "count")
    res.set(xlabel="C = 6ND (FLOPs)", ylabel="observed / law - 1")
    return _save(fig, path)


def plot_predictions(fit: dict, sizes: dict[str, float], tokens: float, path=None) -> Figure:
    """Predicted lr and batch (95% CI) for named model sizes at `tokens`, the fitted N range shaded;
    an interval reaching far beyond the predictions is cut at the edge with an arrow."""
    names = list(sizes)
    preds = [predict(fit, sizes[k], tokens) for k in names]
    n = np.array([sizes[k] for k in names])
    fig, axes = _figure(1, 2)
    for ax, key, label in ((axes[0, 0], "lr", "lr"), (axes[0, 1], "batch_tokens", "batch (tokens)")):
        value = np.array([p[key] for p in preds], float)
        ci = np.array([[np.nan if c is None else c for c in p[f"{key}_ci"]] for p in preds], float)
        cut, limits = _interval_limits(value, ci[:, 0], ci[:, 1])
        _clipped_errorbars(ax, n, value, ci[:, 0], ci[:, 1], ["tab:blue"] * len(n), cut, ms=4, capsize=3)
        for x, y, name in zip(n, value, names, strict=True):
            ax.annotate(name.replace("qwen2.5-", ""), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvspan(*fit["data"]["n_params_range"], color="0.85", label="fitted N range")
        _log_axis(ax, "x", "count")
        _log_axis(ax, "y", "number" if key == "lr" else "count")
        ax.set_xlim(*_log_range([*n, *fit["data"]["n_params_range"]], pad=1.5))
        ax.set_ylim(*limits)
        ax.set(xlabel="N (non-embedding params)", ylabel=f"predicted {label}")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"predictions at D = {format_count(tokens)} tokens (arrows: interval continues)", fontsize=9)
    return _save(fig, path)


def plot_holdout(fit: dict, path=None) -> Figure:
    """Held-out cells: predicted lr and batch over the cell's best (95% interval), and the regret against
    the noise floor, so a miss can be told from luck."""
    held = fit["holdout"]
    rows = held["per_cell"]
    labels = [f"N={format_count(r['n_params'])}\nD={format_count(r['tokens'])}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = _figure(1, 3, size=(max(3.2, 0.6 * len(rows) + 1.2), 3.4))
    for ax, key, ci_key, opt_key, label in (
        (axes[0, 0], "lr_ratio", "lr_ci", "optimum_lr", "lr"),
        (axes[0, 1], "batch_ratio", "batch_tokens_ci", "optimum_batch_tokens", "batch"),
    ):
        ratio = np.array([r[key] for r in rows], float)
        ci = np.array([[np.nan if v is None else v for v in r[ci_key]] for r in rows], float)
        ci = ci / np.array([r[opt_key] for r in rows])[:, None]
        covered = [r[key.replace("ratio", "covered")] for r in rows]
        colors = ["tab:green" if c else "tab:red" if c is False else "0.4" for c in covered]
        cut, limits = _interval_limits([*ratio, 1.0], ci[:, 0], ci[:, 1], span=10.0)
        _clipped_errorbars(ax, x, ratio, ci[:, 0], ci[:, 1], colors, cut, ms=5, capsize=3)
        ax.axhline(1.0, color="k", lw=0.8)
        _log_axis(ax, "y")
        ax.set_ylim(*limits)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel(f"predicted {label} / best {label}")
        ax.set_title(f"{label}: green = interval covers the best", fontsize=8)
    ax = axes[0, 2]
    ax.bar(x, [100 * r["regret"] for r in rows], color="tab:blue", width=0.6)
    noise = held.get("noise_floor")
    if noise is not None:
        ax.axhline(100 * noise, color="tab:orange", ls="--", lw=1, label=f"noise floor {noise:.2%}")
        ax.legend(fontsize=7)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("regret (%)")
    mean = "n/a" if held["mean"] is None else f"{held['mean']:.2%}"
    ax.set_title(f"regret, mean {mean}", fontsize=8)
    fig.suptitle(
        f"holdout {held['spec']}: fitted on {held['cells_fitted']} cells, {held['estimator']} estimator", fontsize=9
    )
    return _save(fig, path)


def make_plots(
    df: pd.DataFrame,
    fit: dict,
    outdir,
    sizes: dict[str, float] | None = None,
    tokens: float | None = None,
    dpi: int = DPI,
) -> list[Path]:
    """Every plot a fit supports, as PNGs in `outdir` (at `dpi`: a notebook keeps its outputs small with
    less); returns the paths written."""
    outdir = Path(outdir)
    jobs = [
        ("lr_sweeps.png", lambda: plot_lr_sweeps(df, fit)),
        ("batch_sweeps.png", lambda: plot_batch_sweeps(df, fit)),
        ("hparam_laws.png", lambda: plot_hparam_laws(fit)),
    ]
    if fit.get("loss_law"):
        jobs.append(("loss_law.png", lambda: plot_loss_law(df, fit)))
    if fit.get("holdout"):
        jobs.append(("holdout.png", lambda: plot_holdout(fit)))
    if sizes:
        jobs.append(("predictions.png", lambda: plot_predictions(fit, sizes, tokens or QWEN25_TOKENS)))
    paths = []
    for name, draw in jobs:
        _save(draw(), outdir / name, dpi)
        paths.append(outdir / name)
    return paths
