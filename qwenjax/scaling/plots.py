"""PNG plots of sweeps and fits, drawn on bare matplotlib Figures (Agg canvas, no pyplot global state).

Each `plot_*` returns its Figure and, given `path`, also writes it as PNG, so the CLI saves files and a
notebook can display the same figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from qwenjax.scaling.cells import config_table
from qwenjax.scaling.hparams import evaluate_law
from qwenjax.scaling.loss_law import evaluate_loss_law, loss_points
from qwenjax.scaling.predict import QWEN25_TOKENS, predict
from qwenjax.scaling.units import format_count

_CELL = ["n_params", "tokens"]


def _figure(rows: int = 1, cols: int = 1, size=(5.0, 3.8)):
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def _colors(n: int):
    return colormaps["viridis"](np.linspace(0.05, 0.9, max(n, 1)))


def _sweep_panels(df: pd.DataFrame, fit: dict, x: str, series: str, path, title: str) -> Figure:
    """A panel per (N, D) cell: loss against `x`, a line per `series` value; optimum and prediction marked."""
    ns, ds = np.sort(df["n_params"].unique()), np.sort(df["tokens"].unique())
    fig, axes = _figure(len(ns), len(ds), size=(3.4, 2.7))
    optima = {(c["n_params"], c["tokens"]): c for c in fit.get("cell_optima", [])}
    for i, n in enumerate(ns):
        for j, d in enumerate(ds):
            ax = axes[i, j]
            ax.set_xscale("log")
            ax.set_title(f"N={format_count(n)} D={format_count(d)}", fontsize=8)
            runs = df[(df["n_params"] == n) & (df["tokens"] == d)]
            if runs.empty:
                ax.set_visible(False)
                continue
            ok = config_table(runs)  # seed means
            values = np.sort(runs[series].unique())
            for color, value in zip(_colors(len(values)), values, strict=True):
                line = ok[ok[series] == value].sort_values(x)
                label = f"{format_count(value)}" if series == "batch_tokens" else f"{value:.2g}"
                ax.plot(line[x], line["loss"], "o-", ms=2.5, lw=0.8, color=color, label=label)
            if not ok.empty:
                best = ok["loss"].min()
                ax.set_ylim(best * 0.995, min(ok["loss"].max(), best * 1.15) * 1.005)
                bad = runs[~runs["valid"]]
                if len(bad):  # diverged / failed runs pinned to the top edge
                    ax.plot(
                        bad[x], np.full(len(bad), ax.get_ylim()[1]), "x", color="red", ms=4, clip_on=False
                    )
            cell = optima.get((float(n), float(d)))
            if cell:
                opt = pd.DataFrame(cell["optima"], columns=["lr", "batch_tokens"])
                # a near-optimal run is starred at its own loss; a quadratic vertex at the cell's best loss
                runs_at = ok[["lr", "batch_tokens", "loss"]].astype(float)
                opt = opt.merge(runs_at, how="left").fillna({"loss": cell["best_loss"]})
                ax.plot(opt[x], opt["loss"], "*", color="crimson", ms=8, zorder=5)
                if fit.get("laws"):
                    pred = float(evaluate_law(fit["laws"][x], n, d)[0])
                    ax.axvline(pred, color="k", ls="--", lw=0.8)
            ax.tick_params(which="both", labelsize=7)
            ax.xaxis.set_minor_locator(LogLocator(subs=(2, 5)))
            for axis_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                axis_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0, 0].legend(fontsize=6, title=series, title_fontsize=6)
    fig.suptitle(title + "  (* optimum, -- law prediction, x diverged/failed)", fontsize=9)
    return _save(fig, path)


def plot_lr_sweeps(df: pd.DataFrame, fit: dict, path=None) -> Figure:
    """Loss against learning rate in every cell, one line per batch size."""
    return _sweep_panels(df, fit, "lr", "batch_tokens", path, "loss vs learning rate")


def plot_batch_sweeps(df: pd.DataFrame, fit: dict, path=None) -> Figure:
    """Loss against batch size (tokens) in every cell, one line per learning rate."""
    return _sweep_panels(df, fit, "batch_tokens", "lr", path, "loss vs batch size (tokens)")


def _band(ax, xs, law, n, d, color):
    value, (lo, hi) = evaluate_law(law, n, d)
    ax.plot(xs, value, color=color, lw=1)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)


def plot_hparam_laws(fit: dict, path=None) -> Figure:
    """lr* and B* against N (a line per D) and against D (a line per N): cell optima, power law, 95% band."""
    fig, axes = _figure(2, 2)
    cells = fit["cell_optima"]
    ns = np.array(fit["data"]["n_params_values"])
    ds = np.array(fit["data"]["tokens_values"])
    for row, target in enumerate(("lr", "batch_tokens")):
        law = fit["laws"][target]
        for col, (axis, others) in enumerate((("n_params", ds), ("tokens", ns))):
            ax = axes[row, col]
            grid = np.geomspace(*(ns if axis == "n_params" else ds)[[0, -1]], 50)
            for color, other in zip(_colors(len(others)), others, strict=True):
                n, d = (grid, other) if axis == "n_params" else (other, grid)
                _band(ax, grid, law, n, d, color)
                for c in cells:
                    if c["tokens" if axis == "n_params" else "n_params"] == other:
                        values = np.array(c["optima"])[:, row]
                        ax.plot(np.full(len(values), c[axis]), values, "o", color=color, ms=3)
                ax.plot(
                    [], [], color=color, label=("D=" if axis == "n_params" else "N=") + format_count(other)
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
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
    for color, d in zip(_colors(len(ds)), ds, strict=True):
        value, (lo, hi) = evaluate_loss_law(law, grid, d)
        ax.plot(grid, value, color=color, lw=1, label=f"D={format_count(d)}")
        ax.fill_between(grid, lo, hi, color=color, alpha=0.2, lw=0)
        at = points[points["tokens"] == d]
        ax.plot(at["n_params"], at["loss"], "o", color=color, ms=3)
        res.plot(
            at["n_params"] * at["tokens"] * 6,
            at["loss"] / evaluate_loss_law(law, at["n_params"], d)[0] - 1,
            "o",
            color=color,
            ms=3,
        )
    ax.set(xscale="log", xlabel="N (non-embedding params)", ylabel="best loss in cell")
    ax.set_title(
        "L = E + A/N^alpha + B/D^beta  " + ", ".join(f"{k}={v['value']:.3g}" for k, v in law["coef"].items()),
        fontsize=8,
    )
    ax.legend(fontsize=6)
    res.axhline(0, color="k", lw=0.8)
    res.set(xscale="log", xlabel="C = 6ND (FLOPs)", ylabel="observed / law - 1")
    return _save(fig, path)


def plot_predictions(fit: dict, sizes: dict[str, float], tokens: float, path=None) -> Figure:
    """Predicted lr and batch (95% CI) for named model sizes at `tokens`, the fitted N range shaded."""
    names = list(sizes)
    preds = [predict(fit, sizes[k], tokens) for k in names]
    n = np.array([sizes[k] for k in names])
    fig, axes = _figure(1, 2)
    for ax, key, label in ((axes[0, 0], "lr", "lr"), (axes[0, 1], "batch_tokens", "batch (tokens)")):
        value = np.array([p[key] for p in preds], float)
        ci = np.array([[np.nan if c is None else c for c in p[f"{key}_ci"]] for p in preds], float)
        ax.errorbar(
            n, value, yerr=np.clip([value - ci[:, 0], ci[:, 1] - value], 0, None), fmt="o", ms=4, capsize=3
        )
        for x, y, name in zip(n, value, names, strict=True):
            ax.annotate(
                name.replace("qwen2.5-", ""), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.axvspan(*fit["data"]["n_params_range"], color="0.85", label="fitted N range")
        ax.set(xscale="log", yscale="log", xlabel="N (non-embedding params)", ylabel=f"predicted {label}")
        ax.legend(fontsize=7)
    fig.suptitle(f"predictions at D = {format_count(tokens)} tokens", fontsize=9)
    return _save(fig, path)


def plot_holdout(fit: dict, path=None) -> Figure:
    """Held-out cells: predicted lr and batch over the cell's best (95% interval), and the regret against
    the noise floor, so a miss can be told from luck."""
    held = fit["holdout"]
    rows = held["per_cell"]
    labels = [f"N={format_count(r['n_params'])}\nD={format_count(r['tokens'])}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = _figure(1, 3, size=(max(3.2, 0.9 * len(rows) + 1.5), 3.4))
    for ax, key, ci_key, opt_key, label in (
        (axes[0, 0], "lr_ratio", "lr_ci", "optimum_lr", "lr"),
        (axes[0, 1], "batch_ratio", "batch_tokens_ci", "optimum_batch_tokens", "batch"),
    ):
        ratio = np.array([r[key] for r in rows])
        ci = np.array([[np.nan if v is None else v for v in r[ci_key]] for r in rows], float)
        ci = ci / np.array([r[opt_key] for r in rows])[:, None]
        covered = [r[key.replace("ratio", "covered")] for r in rows]
        colors = ["tab:green" if c else "tab:red" if c is False else "0.4" for c in covered]
        err = np.clip([ratio - ci[:, 0], ci[:, 1] - ratio], 0, None)
        for xi, yi, e0, e1, color in zip(x, ratio, *err, colors, strict=True):
            ax.errorbar(xi, yi, yerr=[[e0], [e1]], fmt="o", color=color, ms=5, capsize=3)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel(f"predicted {label} / best {label}")
        ax.set_title(f"{label}: green = interval covers the best", fontsize=8)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            set_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
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
    df: pd.DataFrame, fit: dict, outdir, sizes: dict[str, float] | None = None, tokens: float | None = None
) -> list[Path]:
    """Every plot a fit supports, as PNGs in `outdir`; returns the paths written."""
    outdir = Path(outdir)
    jobs = [
        ("lr_sweeps.png", lambda p: plot_lr_sweeps(df, fit, p)),
        ("batch_sweeps.png", lambda p: plot_batch_sweeps(df, fit, p)),
        ("hparam_laws.png", lambda p: plot_hparam_laws(fit, p)),
    ]
    if fit.get("loss_law"):
        jobs.append(("loss_law.png", lambda p: plot_loss_law(df, fit, p)))
    if fit.get("holdout"):
        jobs.append(("holdout.png", lambda p: plot_holdout(fit, p)))
    if sizes:
        jobs.append(("predictions.png", lambda p: plot_predictions(fit, sizes, tokens or QWEN25_TOKENS, p)))
    paths = []
    for name, draw in jobs:
        draw(outdir / name)
        paths.append(outdir / name)
    return paths
