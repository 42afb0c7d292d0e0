"""The estimators, the noise floor and held-out validation against synthetic laws whose truth is known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from qwenjax.errors import UserError
from qwenjax.scaling import (
    ESTIMATORS,
    STEP_LAW,
    fit_hparam_laws,
    fit_loss_law,
    holdout_validation,
    load_results,
    make_fit,
    noise_floor,
    parse_prior,
)
from qwenjax.scaling.holdout import held_out_cells
from qwenjax.scaling.loss_law import PARAMS, _descend, _minimise, loss_points
from qwenjax.scaling.synthetic import SyntheticLaw, synthetic_results, write_results

# A law away from Step Law's exponents (so the prior must yield to the data), with a steeper wall above the
# optimal lr than below it, anchored to Step Law's optimum in the middle of the grid.
TRUTH = {"alpha": -0.5, "beta": 0.15, "gamma": 0.1, "delta": 0.45}
_N0, _D0 = 2.8e6, 7e7


def _law(lr_asymmetry: float = 2.0, **exponents) -> SyntheticLaw:
    base, e = SyntheticLaw(), {**TRUTH, **exponents}
    return SyntheticLaw(
        a=base.lr_star(_N0, _D0) / (_N0 ** e["alpha"] * _D0 ** e["beta"]),
        b=base.batch_star(_N0, _D0) / (_N0 ** e["gamma"] * _D0 ** e["delta"]),
        lr_asymmetry=lr_asymmetry,
        **e,
    )


def _table(tmp_path, name="r.jsonl", **kw) -> pd.DataFrame:
    options = dict(
        n_values=(1e6, 2e6, 4e6, 8e6), d_values=(2.5e7, 5e7, 1e8, 2e8), lr_span=3, batch_span=2, noise=3e-3
    )
    law = kw.pop("law", None) or _law()
    return load_results(write_results(tmp_path / name, synthetic_results(law, **{**options, **kw})))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return _table(tmp_path_factory.mktemp("noisy"), seed=1)


# --- every estimator recovers a noisy law ------------------------------------------------------------------


@pytest.mark.parametrize("method", ESTIMATORS)
def test_every_estimator_recovers_a_noisy_law(noisy, method):
    """0.3% loss noise on a 2^(1/2) lr grid: exponents within 0.1 of the truth, regret near the noise."""
    fit = fit_hparam_laws(noisy, method=method, bootstrap=30)
    coef = {**fit["laws"]["lr"]["coef"], **fit["laws"]["batch_tokens"]["coef"]}
    for name, value in TRUTH.items():
        assert coef[name]["value"] == pytest.approx(value, abs=0.1), (method, name)
    assert fit["method"]["estimator"] == fit["method"]["optimum"] == method
    assert fit["regret"]["cells_evaluated"] == 16
    assert fit["regret"]["mean"] < 0.003 and fit["regret"]["max"] < 0.01
    assert fit["laws"]["lr"]["bootstrap"]["failed"] <= 3 and len(fit["laws"]["lr"]["bootstrap"]["samples"]) >= 27


def test_surface_is_exact_on_a_clean_law(tmp_path):
    """Without noise the joint surface finds the exponents almost exactly, from between the grid points."""
    fit = fit_hparam_laws(_table(tmp_path, noise=0.0, law=_law(lr_asymmetry=1.0)), method="surface", bootstrap=0)
    coef = {**fit["laws"]["lr"]["coef"], **fit["laws"]["batch_tokens"]["coef"]}
    for name, value in TRUTH.items():
        assert coef[name]["value"] == pytest.approx(value, abs=0.02), name
    assert fit["method"]["surface"]["converged"] and "fallback" not in fit["method"]["surface"]


def test_prior_keeps_the_sign_that_two_noisy_budgets_flip(tmp_path):
    """Two token budgets and 1% noise: nearopt's beta comes out negative; the prior keeps Step Law's sign."""
    df = _table(
        tmp_path,
        law=SyntheticLaw(),
        n_values=(1e6, 2e6, 4e6),
        d_values=(5e7, 1e8),
        lr_span=2,
        batch_span=1,
        lr_per_octave=1,
        noise=0.01,
        seed=2,
    )
    beta = lambda m: fit_hparam_laws(df, method=m, bootstrap=0, loo=False)["laws"]["lr"]["coef"]["beta"]["value"]
    assert beta("nearopt") < 0 < beta("prior")


def test_prior_yields_when_the_data_insist(tmp_path):
    """Four budgets over 8x with little noise: a negative beta survives a prior centred on +0.307."""
    fit = fit_hparam_laws(_table(tmp_path, law=_law(beta=-0.4), noise=3e-4), method="prior", bootstrap=0)
    assert fit["laws"]["lr"]["coef"]["beta"]["value"] < -0.3
    assert fit["method"]["prior"]["mean"] == STEP_LAW


def test_parse_prior_schema(tmp_path):
    assert parse_prior(None)["mean"] == STEP_LAW
    p = parse_prior('{"alpha": -0.5, "sd": {"alpha": 0.1}}')
    assert p["mean"]["alpha"] == -0.5 and p["mean"]["beta"] == STEP_LAW["beta"]
    assert p["sd"]["alpha"] == 0.1 and p["sd"]["beta"] == 0.2
    assert set(parse_prior({"sd": 0.5})["sd"].values()) == {0.5}
    (tmp_path / "prior.json").write_text(json.dumps({"delta": 0.5}))
    assert parse_prior(str(tmp_path / "prior.json"))["mean"]["delta"] == 0.5
    for bad, match in [
        ('{"alpah": 1}', r"unknown key 'alpah' \(allowed: alpha, beta, gamma, delta, sd\)"),
        ('{"sd": {"x": 1}}', "unknown key 'sd.x'"),
        ('{"beta": "big"}', "beta must be a number"),
        ('{"sd": -1}', "sd must be a positive number"),
        ("[1]", "must be a JSON object"),
        ("{nope", "not valid JSON"),
        (str(tmp_path / "missing.json"), "JSON object or the path of a JSON file"),
    ]:
        with pytest.raises(UserError, match=match):
            parse_prior(bad)


def test_a_fit_file_is_a_prior(noisy, tmp_path):
    """A FIT.json as --prior: its exponents are the means, their bootstrap sds the sds (at least 0.02)."""
    from qwenjax.scaling import make_fit, save_fit

    fit = make_fit(noisy, method="nearopt", bootstrap=50, loss_law=False)
    path = save_fit(fit, tmp_path / "FIT.json")
    prior = parse_prior(str(path))
    assert prior["mean"]["alpha"] == pytest.approx(fit["laws"]["lr"]["log_coef"][1])
    assert prior["mean"]["delta"] == pytest.approx(fit["laws"]["batch_tokens"]["log_coef"][2])
    assert all(sd >= 0.02 for sd in prior["sd"].values()) and prior["source"] == "FIT.json"
    leaned = make_fit(noisy, method="prior", prior=str(path), bootstrap=0, loss_law=False)
    assert leaned["method"]["prior"]["mean"] == prior["mean"]
    with pytest.raises(UserError, match="not a complete qwenjax fit"):
        parse_prior({"format": "qwenjax-fit/1", "laws": {}})


def test_cells_weighted_by_their_uncertainty(noisy):
    """Weights are normalised; a cell whose grid never varied the batch says nothing about B* and gets ~0."""
    fit = fit_hparam_laws(noisy, method="nearopt", bootstrap=0)
    cells = fit["cell_optima"]
    assert sum(c["weight_lr"] for c in cells) == pytest.approx(1)
    assert all(c["sd_log_lr"] > 0 for c in cells)
    first = (noisy["n_params"] == 1e6) & (noisy["tokens"] == 2.5e7)
    one_batch = noisy[~first | (noisy["batch_tokens"] == noisy.loc[first, "batch_tokens"].median())]
    thin = fit_hparam_laws(one_batch, method="nearopt", bootstrap=0)["cell_optima"]
    assert thin[0]["weight_batch"] < 0.02 * max(c["weight_batch"] for c in thin[1:])
    assert thin[0]["weight_lr"] > 0.02  # its lr sweep still counts
    weights = fit["method"]["weights"]
    assert weights["noise_source"].startswith("estimated") and 0.001 < weights["noise"] < 0.006


# --- seeds and the noise floor -----------------------------------------------------------------------------


def test_noise_floor_measured_on_multi_seed_data(tmp_path):
    df = _table(tmp_path, n_values=(1e6, 4e6), d_values=(5e7, 2e8), batch_span=1, seeds=4, noise=0.004)
    floor = noise_floor(df)
    assert floor["cells_measured"] == floor["cells_total"] == 4 and floor["seeds"] == 4
    assert floor["relative"] == pytest.approx(0.004, rel=0.4)
    for cell in floor["cells"]:
        assert len(cell["losses"]) == 4 and sorted(cell["seeds"]) == [0, 1, 2, 3]
        assert cell["relative_std"] == pytest.approx(np.std(cell["losses"], ddof=1) / np.mean(cell["losses"]))
        runs = df[(df["n_params"] == cell["n_params"]) & (df["tokens"] == cell["tokens"]) & df["valid"]]
        means = runs.groupby(["lr", "batch_tokens"])["loss"].mean()
        assert means.idxmin() == (cell["lr"], cell["batch_tokens"])  # the cell's optimum by seed mean
    pooled = np.sqrt(np.mean([c["relative_std"] ** 2 for c in floor["cells"]]))
    assert floor["relative"] == pytest.approx(pooled)
    fit = make_fit(df, bootstrap=0, loss_law=False)
    assert fit["noise"] == floor and fit["method"]["weights"]["noise_source"] == "measured (noise floor)"


def test_noise_floor_exact_and_not_measured():
    rows = [  # cell 1: two configs with two seeds, the lower mean wins; cell 2: one seed only
        (1e6, 1e8, 1e-3, 1024, 0, 3.00),
        (1e6, 1e8, 1e-3, 1024, 1, 3.06),
        (1e6, 1e8, 2e-3, 1024, 0, 3.10),
        (1e6, 1e8, 2e-3, 1024, 1, 3.20),
        (2e6, 1e8, 1e-3, 1024, 0, 2.90),
    ]
    df = pd.DataFrame(rows, columns=["n_params", "tokens", "lr", "batch_tokens", "seed", "loss"]).assign(valid=True)
    floor = noise_floor(df)
    assert floor["cells_measured"] == 1 and floor["cells_total"] == 2
    assert floor["cells"][0]["lr"] == 1e-3 and floor["cells"][0]["losses"] == [3.00, 3.06]
    assert floor["relative"] == pytest.approx(np.std([3.0, 3.06], ddof=1) / 3.03)
    alone = noise_floor(df.assign(seed=0))
    assert alone["relative"] is None and alone["cells"] == [] and "not measured" in alone["note"]


def test_seeds_are_averaged_before_optima(tmp_path):
    """Two seeds with mirrored noise average to the clean loss: the same optima and loss points as one clean seed
    (the laws differ only through the weights, which now know the noise)."""
    clean = synthetic_results(_law(), n_values=(1e6, 4e6), d_values=(5e7, 2e8), lr_span=2, batch_span=1, noise=0.0)
    twins = []
    for r in clean:
        for s, sign in ((0, 1), (1, -1)):
            loss = None if r["eval_loss"] is None else r["eval_loss"] * (1 + sign * 0.01)
            twins.append({**r, "run_id": f"{r['run_id']}-{s}", "seed": s, "eval_loss": loss, "final_loss": loss})
    one = load_results(write_results(tmp_path / "one.jsonl", clean))
    two = load_results(write_results(tmp_path / "two.jsonl", twins))
    a, b = (fit_hparam_laws(df, method="nearopt", bootstrap=0) for df in (one, two))
    assert [c["optima"] for c in a["cell_optima"]] == [c["optima"] for c in b["cell_optima"]]
    assert np.allclose(loss_points(one)["loss"], loss_points(two)["loss"])
    assert b["noise"]["relative"] == pytest.approx(0.01 * np.sqrt(2), rel=1e-6)


# --- held-out validation -----------------------------------------------------------------------------------


def test_holdout_on_a_synthetic_law_reports_near_zero_regret(tmp_path):
    df = _table(tmp_path, noise=3e-4, seed=3)
    held = holdout_validation(df, "largest", method="surface", bootstrap=50)
    assert held["cells_held_out"] == 7 and held["cells_fitted"] == 9
    assert held["fitted_n_params"] == [1e6, 2e6, 4e6] and held["fitted_tokens"] == [2.5e7, 5e7, 1e8]
    assert held["mean"] < 0.001 and held["max"] < 0.002
    for row in held["per_cell"]:
        assert row["n_params"] == 8e6 or row["tokens"] == 2e8
        assert 0.5 < row["lr_ratio"] < 2 and 0.5 < row["batch_ratio"] < 2  # the best run is on a factor-2 grid
        assert row["lr_ci"][0] <= row["lr"] <= row["lr_ci"][1]
        assert isinstance(row["lr_covered"], bool) and row["noise"] is None
    assert held["noise_floor"] is None and held["estimator"] == "surface"


def test_held_out_cells_spec():
    keys = pd.DataFrame([(n, d) for n in (1e6, 2e6, 4e6) for d in (5e7, 1e8)], columns=["n_params", "tokens"])
    pick = lambda spec: [tuple(k) for k in keys[held_out_cells(spec, keys)].to_numpy()]
    assert pick("largest") == [(1e6, 1e8), (2e6, 1e8), (4e6, 5e7), (4e6, 1e8)]
    assert pick("N>=2M") == pick("N >= 2e6") == [(2e6, 5e7), (2e6, 1e8), (4e6, 5e7), (4e6, 1e8)]
    assert pick("D>=100M") == pick("D>=1e8") == [(1e6, 1e8), (2e6, 1e8), (4e6, 1e8)]
    assert pick("N>=4M,D>=1e8") == pick("largest")
    for bad in ("", "N>2M", "Q>=1", "N>=lots", "biggest", "N>=-1"):
        with pytest.raises(UserError, match="--holdout must be 'largest'"):
            held_out_cells(bad, keys)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("N>=2M", r"leaves N: 1 value \(1M\) and D: 4 values .* the laws need two or more N"),
        ("D>=1", r"holds out no cells|leaves N: 0 values"),
        ("N>=1G", "holds out no cells"),
    ],
)
def test_holdout_that_leaves_too_little(noisy, spec, match):
    with pytest.raises(UserError, match=match):
        holdout_validation(noisy, spec, bootstrap=0)


# --- the loss law's batched bootstrap ----------------------------------------------------------------------


def test_loss_law_batched_refits_match_bfgs(noisy):
    """Each batched bootstrap refit lands where a scipy BFGS refit of the same resample does."""
    law = fit_loss_law(noisy, bootstrap=0)
    points = loss_points(noisy)
    data = tuple(np.log(points[c].to_numpy()) for c in ("n_params", "tokens", "loss"))
    theta = np.array([law["theta"][p] for p in PARAMS])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(points), (12, len(points)))
    counts = np.stack([np.bincount(i, minlength=len(points)) for i in idx]).astype(float)
    batched, _, converged = _descend(np.tile(theta, (len(idx), 1)), data, counts)
    assert converged.all()
    for row, i in zip(batched, idx, strict=True):
        ref = _minimise(theta, tuple(d[i] for d in data))[0]
        assert np.allclose(row, ref, atol=1e-4), (row, ref)


# --- the comparison and the benchmark ----------------------------------------------------------------------


def test_compare_prints_a_markdown_table(noisy, tmp_path, capsys):
    from qwenjax.scaling import compare

    path = tmp_path / "real.jsonl"
    noisy.drop(columns=["valid", "loss", "source"]).to_json(path, orient="records", lines=True)
    assert compare.main([str(path), "--synthetic", "--draws", "1", "--methods", "nearopt,prior"]) == 0
    out = capsys.readouterr().out
    assert "| data | check | nearopt | prior |" in out
    assert "| real.jsonl: 16 cells, noise floor not measured | leave-one-cell-out |" in out
    assert out.count("holdout largest, noise-free") == 2 and "lowest: " in out
    assert compare.main(["--methods", "ridge", "--synthetic"]) == 2


def test_bench_results_are_2000_runs_in_20_cells(tmp_path):
    from qwenjax.scaling.bench_fit import bench_results

    assert bench_results(tmp_path / "r.jsonl") == 2100
    df = load_results(tmp_path / "r.jsonl")
    assert len(df[["n_params", "tokens"]].drop_duplicates()) == 20 and df["seed"].nunique() == 3
