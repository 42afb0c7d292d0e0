"""Every plot `make_plots` draws is readable: its axes cover the runs that finished (diverged runs are pinned
to the edge instead of stretching them), no two tick labels overlap, and intervals far wider than the plot
are cut at the axes with an arrow. Checked on the committed CPU ladder and on a synthetic sweep with runs
diverged at lr = 4 and a fit whose intervals span many decades."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from qwenjax.scaling import QWEN25_PRESETS, load_results, make_fit, make_plots, plots, preset_n_params
from qwenjax.scaling.synthetic import synthetic_results, write_results

LADDER = Path(__file__).parent.parent / "sweeps" / "results" / "cpu-ladder.jsonl"
SIZES = {name: preset_n_params(name) for name in QWEN25_PRESETS}
TOL = 1e-6


def _synthetic(tmp_path_factory):
    rows = synthetic_results(n_values=(1e6, 2e6, 4e6), d_values=(2.5e7, 5e7, 1e8), lr_span=3, batch_span=1)
    for row in rows[:: len(rows) // 9]:  # a run at lr = 4 diverged in several cells, one failed
        rows.append(
            {
                **row,
                "run_id": row["run_id"] + "-lr4",
                "lr": 4.0,
                "diverged": True,
                "status": "diverged",
                "eval_loss": None,
                "final_loss": None,
            }
        )
    rows.append(
        {
            **rows[0],
            "run_id": "failed",
            "lr": 1e-6,
            "status": "failed",
            "eval_loss": None,
            "final_loss": None,
            "diverged": False,
        }
    )
    df = load_results(write_results(tmp_path_factory.mktemp("synthetic") / "results.jsonl", rows))
    fit = make_fit(df, bootstrap=30, holdout="largest")
    for law in fit["laws"].values():  # a fit nobody should trust: bootstrap spread blown up 60x
        samples = np.asarray(law["bootstrap"]["samples"], float)
        law["bootstrap"]["samples"] = (law["log_coef"] + 60 * (samples - samples.mean(0))).tolist()
    cell = fit["holdout"]["per_cell"][0]
    cell["lr_ci"], cell["batch_tokens_ci"] = [1e-12, 1e4], [1e-3, 1e12]
    return df, fit


@pytest.fixture(scope="module", params=["ladder", "synthetic"])
def case(request, tmp_path_factory):
    if request.param == "ladder":
        df = load_results(LADDER)
        return request.param, df, make_fit(df, bootstrap=30, holdout="largest")
    return (request.param, *_synthetic(tmp_path_factory))


def _figures(df, fit):
    return {
        "lr_sweeps": plots.plot_lr_sweeps(df, fit),
        "batch_sweeps": plots.plot_batch_sweeps(df, fit),
        "hparam_laws": plots.plot_hparam_laws(fit),
        "loss_law": plots.plot_loss_law(df, fit),
        "holdout": plots.plot_holdout(fit),
        "predictions": plots.plot_predictions(fit, SIZES, 18e12),
    }


def _inside(values, limits, log=True):
    lo, hi = sorted(limits)
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return np.all((v >= lo * (1 - TOL) if log else v >= lo - TOL) & (v <= hi * (1 + TOL) if log else v <= hi + TOL))


def _log_fraction(values, limits):
    v = np.asarray(values, float)
    return math.log(v.max() / v.min()) / math.log(limits[1] / limits[0])


def _check_labels(fig, name):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for i, ax in enumerate(fig.axes):
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            texts = [t.get_text() for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            for a in range(len(boxes)):
                for b in range(a + 1, len(boxes)):
                    assert not boxes[a].overlaps(boxes[b]), f"{name} axes {i}: labels {texts[a]!r} {texts[b]!r}"
            if ax.get_visible() and axis.get_scale() == "log":
                assert len(texts) >= 2, f"{name} axes {i}: fewer than two labelled ticks {texts}"
            assert not any("\\times" in t for t in texts), f"{name} axes {i}: {texts}"


def test_plots_are_readable(case):
    kind, df, fit = case
    for name, fig in _figures(df, fit).items():
        _check_labels(fig, name)
        for i, ax in enumerate(fig.axes):
            if not ax.get_visible():
                continue
            where = f"{kind} {name} axes {i}"
            xlim, ylim = ax.get_xlim(), ax.get_ylim()
            for line in ax.get_lines():
                if line.get_gid() in ("diverged", "clipped"):  # pinned to the edge, never outside
                    assert _inside(line.get_xdata(), xlim) and _inside(line.get_ydata(), ylim), where
            for coll in ax.collections:
                if coll.get_gid() == "interval":
                    ys = np.concatenate([seg[:, 1] for seg in coll.get_segments()])
                    assert _inside(ys, ylim), f"{where}: an interval runs off the axes"
            if name.endswith("_sweeps"):
                runs = np.concatenate([ln.get_xdata() for ln in ax.get_lines() if ln.get_linestyle() == "-"])
                assert _inside(runs, xlim), where
                assert _log_fraction(runs, xlim) >= 0.6, f"{where}: runs fill too little of {xlim}"
            if name in ("predictions", "holdout") and ax.get_yscale() == "log":
                points = np.concatenate([ln.get_ydata() for ln in ax.get_lines() if ln.get_marker() == "o"])
                assert _inside(points, ylim), where
                assert ylim[0] >= points.min() / plots._SPAN / 2 and ylim[1] <= points.max() * plots._SPAN * 2, where
            if name == "hparam_laws":
                points = np.concatenate([ln.get_ydata() for ln in ax.get_lines() if ln.get_marker() == "o"])
                assert _inside(points, ylim), where
                assert _log_fraction(points, ylim) >= 0.1, f"{where}: a band stretched {ylim}"
    if kind == "synthetic":
        figs = _figures(df, fit)
        pinned = [ln for ax in figs["lr_sweeps"].axes for ln in ax.get_lines() if ln.get_gid() == "diverged"]
        assert pinned and any(ln.get_marker() == ">" for ln in pinned)  # lr = 4 sits at the right edge
        arrows = [ln for ax in figs["predictions"].axes for ln in ax.get_lines() if ln.get_gid() == "clipped"]
        assert arrows, "the blown-up intervals are cut with an arrow"


def test_make_plots_draws_every_plot(tmp_path, tmp_path_factory):
    df, fit = _synthetic(tmp_path_factory)
    names = [p.name for p in make_plots(df, fit, tmp_path, sizes=SIZES)]
    assert sorted(names) == sorted(f"{name}.png" for name in _figures(df, fit))
    assert all((tmp_path / n).stat().st_size > 10_000 for n in names)
