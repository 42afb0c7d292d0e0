"""The demo's situation simulated inside the committed CPU ladder: fit a small corner (2 N x 2 D) with each
estimator, predict every cell at 2x and more the corner's largest N, and charge the regret.

The `prior` variants take their prior from a fit of the ladder's other cells (never the predicted ones).
Usage: python scripts/prior_transfer.py [RESULTS]  (default sweeps/results/cpu-ladder.jsonl)
"""

from __future__ import annotations

import sys

import numpy as np

from qwenjax.scaling import evaluate_law, fit_hparam_laws, load_results
from qwenjax.scaling.cells import CELL, Cells
from qwenjax.scaling.hparams import check_cells
from qwenjax.scaling.prior import prior_from_fit


def _prior(df) -> dict:
    spec = prior_from_fit({"format": 1, **fit_hparam_laws(df, method="smooth", bootstrap=100, loo=False)})
    return {**spec["mean"], "sd": spec["sd"]}


def main(path: str = "sweeps/results/cpu-ladder.jsonl") -> None:
    df = load_results(path)
    cells = Cells(check_cells(df))
    keys = cells.keys
    n_values, d_values = sorted(keys.n_params.unique()), sorted(keys.tokens.unique())
    cell_of = [(float(n), float(d)) for n, d in df[CELL].to_numpy(float)]

    def regret(fit, n, d):
        i = int(np.flatnonzero((keys.n_params == n) & (keys.tokens == d))[0])
        lr, _ = evaluate_law(fit["laws"]["lr"], n, d)
        batch, _ = evaluate_law(fit["laws"]["batch_tokens"], n, d)
        return cells.regret_row(i, float(np.log(lr)), float(np.log(batch)))["regret"]

    totals: dict[str, list[float]] = {}
    for i in range(len(n_values) - 1):
        for j in range(len(d_values) - 1):
            corner_n, corner_d = n_values[i:i + 2], d_values[j:j + 2]
            targets = [(n, d) for n in n_values for d in d_values if n >= 2 * corner_n[1] and d >= corner_d[0]]
            if not targets:
                continue
            rest = df[[c not in targets for c in cell_of]]
            prior = _prior(rest)
            local = _prior(rest[rest.n_params >= corner_n[0]])
            wide = {**prior, "sd": {k: max(v, 0.1) for k, v in prior["sd"].items()}}
            corner = df[[n in corner_n and d in corner_d for n, d in cell_of]]
            variants = {"nearopt": {"method": "nearopt"}, "smooth": {"method": "smooth"},
                        "prior (Step Law)": {"method": "prior"}, "prior (ladder)": {"method": "prior", "prior": prior},
                        "prior (ladder, corner's N range)": {"method": "prior", "prior": local},
                        "prior (ladder, sd >= 0.1)": {"method": "prior", "prior": wide}}
            line = []
            for name, options in variants.items():
                fit = fit_hparam_laws(corner, bootstrap=20, loo=False, **options)
                got = [regret(fit, n, d) for n, d in targets]
                totals.setdefault(name, []).extend(got)
                line.append(f"{name} {np.mean(got):.2%}")
            print(f"corner N {[int(n) for n in corner_n]} D {[int(d) for d in corner_d]}, {len(targets)} targets: "
                  + ", ".join(line))
    for name, got in totals.items():
        print(f"{name}: mean {np.mean(got):.2%}, max {np.max(got):.2%} over {len(got)} cells")


if __name__ == "__main__":
    main(*sys.argv[1:])
