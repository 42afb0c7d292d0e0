"""Which estimator predicts best: held-out regret of every estimator on real results and on synthetic laws.

    python -m qwenjax.scaling.compare sweeps/results/cpu-ladder.jsonl --synthetic

prints a Markdown table: for each data set, leave-one-cell-out regret and fit-small / predict-largest regret
(`--holdout largest`), "mean / max" per estimator, as `qwenjax fit` measures them (the seed-mean loss of the
swept run nearest the prediction over the cell's best). The synthetic data sets are drawn from known laws
with the noise and grid coarseness of a real CPU ladder: one seed per run with 0.1-0.5% multiplicative loss
noise, lr and batch grids of factor 2 (5 lrs, 3 batches per cell), 4 N over 10x and 3 D over 4x, a loss wall
twice as steep above the optimal lr as below it; once with Step Law's exponents and once with exponents drawn
away from them (so the prior's pull is tested where it is wrong too). There the truth is known, so two more
rows give the noise-free regret: the law's loss at the predicted lr and batch over its optimum.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from qwenjax.errors import UserError
from qwenjax.scaling.holdout import holdout_validation
from qwenjax.scaling.hparams import ESTIMATORS, fit_hparam_laws
from qwenjax.scaling.noise import noise_floor
from qwenjax.scaling.results import load_results
from qwenjax.scaling.synthetic import SyntheticLaw, synthetic_results, write_results

NOISE_LEVELS = (0.001, 0.003, 0.005)
LR_ASYMMETRY = 2.0
N_VALUES = (1e6, 2.15e6, 4.64e6, 1e7)
D_VALUES = (2.5e7, 5e7, 1e8)
CHECKS = ("leave-one-cell-out", "holdout largest", "leave-one-cell-out, noise-free", "holdout largest, noise-free")


def regrets(df: pd.DataFrame, method: str, law: SyntheticLaw | None = None) -> dict:
    """{check: (mean, max) regret of `method`, or None where the check cannot run on this data}."""
    out = {}
    loo = fit_hparam_laws(df, method=method, bootstrap=0)["regret"]
    out[CHECKS[0]] = (loo["mean"], loo["max"]) if loo["mean"] is not None else None
    try:
        held = holdout_validation(df, "largest", method=method, bootstrap=0)
        out[CHECKS[1]] = (held["mean"], held["max"])
    except UserError:
        held = None
        out[CHECKS[1]] = None
    if law is not None:
        for check, rows in ((CHECKS[2], loo["per_cell"]), (CHECKS[3], held["per_cell"] if held else [])):
            true = [float(law.loss(r["n_params"], r["tokens"], r["lr"], r["batch_tokens"])) for r in rows]
            true = np.array(true) / [law.floor(r["n_params"], r["tokens"]) for r in rows] - 1
            out[check] = (float(true.mean()), float(true.max())) if len(true) else None
    return out


def drawn_law(rng: np.random.Generator) -> SyntheticLaw:
    """A law whose exponents are drawn away from Step Law's, anchored to the same optimum mid-grid."""
    base = SyntheticLaw()
    n0, d0 = np.sqrt(N_VALUES[0] * N_VALUES[-1]), np.sqrt(D_VALUES[0] * D_VALUES[-1])
    alpha, beta = rng.uniform(-1.0, -0.3), rng.uniform(-0.1, 0.6)
    gamma, delta = rng.uniform(-0.2, 0.3), rng.uniform(0.3, 0.8)
    a = base.lr_star(n0, d0) / (n0**alpha * d0**beta)
    b = base.batch_star(n0, d0) / (n0**gamma * d0**delta)
    return SyntheticLaw(a=a, alpha=alpha, beta=beta, b=b, gamma=gamma, delta=delta, lr_asymmetry=LR_ASYMMETRY)


def synthetic_sets(draws: int, tmp: Path, seed: int = 0) -> dict[str, list[tuple[SyntheticLaw, pd.DataFrame]]]:
    """Per scenario, `draws` (law, results table) pairs at the noise levels in turn (each table written and
    read back as a results file, so it goes through the same loader as real sweeps)."""
    rng = np.random.default_rng(seed)
    sets = {}
    for name, law_for in (
        ("Step Law exponents", lambda: SyntheticLaw(lr_asymmetry=LR_ASYMMETRY)),
        ("exponents drawn away from Step Law", lambda: drawn_law(rng)),
    ):
        tables = []
        for k in range(draws):
            law = law_for()
            rows = synthetic_results(
                law,
                n_values=N_VALUES,
                d_values=D_VALUES,
                lr_span=2,
                batch_span=1,
                lr_per_octave=1,
                noise=NOISE_LEVELS[k % len(NOISE_LEVELS)],
                seed=seed + k,
            )
            tables.append((law, load_results(write_results(tmp / f"{len(sets)}-{k}.jsonl", rows))))
        sets[f"synthetic, {name}: {draws} draws, {len(N_VALUES) * len(D_VALUES)} cells, noise 0.1-0.5%"] = tables
    return sets


def compare(real: dict[str, pd.DataFrame], synthetic: dict[str, list], methods=ESTIMATORS) -> tuple[str, dict]:
    """The Markdown table and {method: mean of its mean regrets over every row}."""
    lines = ["| data | check | " + " | ".join(methods) + " |", "|---|---|" + "---:|" * len(methods)]
    score = {m: [] for m in methods}

    def add(label, results):  # results: {method: [per-table {check: (mean, max) | None}]}
        for check in CHECKS:
            if check not in results[methods[0]][0]:
                continue
            cells = []
            for m in methods:
                got = [r[check] for r in results[m] if r[check] is not None]
                if not got:
                    cells.append("n/a")
                    continue
                mean, worst = np.mean([g[0] for g in got]), np.mean([g[1] for g in got])
                score[m].append(mean)
                cells.append(f"{mean:.2%} / {worst:.2%}")
            lines.append(f"| {label if check == CHECKS[0] else ''} | {check} | " + " | ".join(cells) + " |")
            label = ""

    for name, df in real.items():
        floor = noise_floor(df)["relative"]
        noise = "noise floor not measured" if floor is None else f"noise floor {floor:.2%}"
        cells = len(df[df["valid"]][["n_params", "tokens"]].drop_duplicates())
        add(f"{name}: {cells} cells, {noise}", {m: [regrets(df, m)] for m in methods})
    for name, tables in synthetic.items():
        add(name, {m: [regrets(df, m, law) for law, df in tables] for m in methods})
    means = {m: float(np.mean(v)) if v else float("nan") for m, v in score.items()}
    return "\n".join(lines), means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwenjax.scaling.compare",
        description="Held-out regret of every estimator on results files and synthetic laws (Markdown table).",
    )
    parser.add_argument("results", nargs="*", metavar="RESULTS.jsonl", help="real sweep results (each one data set)")
    parser.add_argument("--synthetic", action="store_true", help="also compare on synthetic laws with noise")
    parser.add_argument("--draws", type=int, default=12, help="synthetic draws per scenario (default 12)")
    parser.add_argument("--methods", default=",".join(ESTIMATORS), help="comma-separated estimators")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(","))
    try:
        bad = [m for m in methods if m not in ESTIMATORS]
        if bad:
            raise UserError(f"unknown estimator {bad[0]!r} (have {', '.join(ESTIMATORS)})")
        if not args.results and not args.synthetic:
            raise UserError("give results files and/or --synthetic")
        real = {Path(p).name: load_results(p) for p in args.results}
        with tempfile.TemporaryDirectory() as tmp:
            synthetic = synthetic_sets(args.draws, Path(tmp)) if args.synthetic else {}
            table, means = compare(real, synthetic, methods)
    except UserError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    print(table)
    best = min(means, key=lambda m: (np.nan_to_num(means[m], nan=np.inf)))
    print()
    print("mean regret over all rows: " + ", ".join(f"{m} {v:.2%}" for m, v in means.items()))
    print(f"lowest: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
