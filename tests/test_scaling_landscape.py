"""The ladder rules on results tables: bending landscapes, best loss falling with N and D."""

import itertools
import math

import pandas as pd

from qwenjax.scaling import ladder_checks, ladder_message


def _table(loss_fn, ns=(1e4, 1e5), ds=(1e6, 4e6), lrs=(1e-3, 2e-3, 4e-3, 8e-3), batches=(512, 1024, 2048)):
    rows = [{"n_params": n, "tokens": d, "lr": lr, "batch_tokens": b, "seed": 0, "status": "ok",
             "loss": loss_fn(n, d, lr, b)}
            for n, d, lr, b in itertools.product(ns, ds, lrs, batches)]
    df = pd.DataFrame(rows)
    df["valid"] = df["loss"].apply(math.isfinite)
    return df


def _bowl(n, d, lr, b):
    return (2 + 10 / n**0.3 + 30 / d**0.3) * (1 + 0.02 * math.log(lr / 2.8e-3) ** 2 + 0.01 * math.log(b / 1024) ** 2)


def test_a_bowl_obeys_the_rules():
    checks = ladder_checks(_table(_bowl))
    assert checks["ok"] and checks["cells_bending"] == 4 and checks["falls_with_n"] and checks["falls_with_d"]
    cell = checks["cells"][0]
    assert cell["lr_span"] == 8 and cell["batch_span"] == 4
    assert min(cell["low_edge_excess"], cell["high_edge_excess"]) > 0.01
    assert "4/4 cells bend" in ladder_message(checks)


def test_flat_edges_a_narrow_grid_and_a_larger_model_that_loses_are_flagged():
    flat = lambda n, d, lr, b: _bowl(n, d, min(lr, 2.8e-3), b)  # noqa: E731 -- no wall above the optimum
    checks = ladder_checks(_table(flat))
    assert not checks["ok"] and checks["cells_bending"] == 0 and checks["cells"][0]["high_edge_excess"] < 0.01
    assert ladder_checks(_table(_bowl, lrs=(1e-3, 2e-3, 4e-3)))["cells_bending"] == 0  # lr span 4x < 8x
    worse_big = lambda n, d, lr, b: _bowl(n, d, lr, b) * (1.2 if n > 5e4 else 1)  # noqa: E731
    checks = ladder_checks(_table(worse_big))
    assert not checks["falls_with_n"] and checks["falls_with_d"] and "with N at every D: NO" in ladder_message(checks)


def test_a_diverged_edge_counts_as_worse():
    def diverging(n, d, lr, b):
        return math.inf if lr > 5e-3 else _bowl(n, d, lr, b)

    df = _table(diverging)
    df.loc[~df["valid"], "status"] = "diverged"
    assert ladder_checks(df)["cells"][0]["high_edge_excess"] == math.inf
