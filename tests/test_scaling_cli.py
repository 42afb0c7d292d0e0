"""`qwenjax fit` and `qwenjax predict` end to end, and one clear error line for every kind of bad input."""

from __future__ import annotations

import json

import pytest

import qwenjax.cli
import qwenjax.scaling
from qwenjax.scaling import QWEN25_PRESETS, load_fit
from qwenjax.scaling.synthetic import synthetic_results, write_results

# Non-embedding N of the seven presets (docs: qwen2.5 spec, table 2.1), patched in to pin the fit's inputs.
QWEN25_N = dict(
    zip(
        QWEN25_PRESETS,
        (
            357_898_112,
            1_310_340_608,
            2_774_773_760,
            6_525_621_760,
            13_212_898_304,
            31_206_740_992,
            70_214_787_072,
        ),
        strict=True,
    )
)


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `qwenjax ...` in-process; returns (exit status, stdout, stderr)."""

    def run(*argv):
        status = qwenjax.cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    rows = synthetic_results(n_values=(1e6, 2e6, 4e6), d_values=(2.5e7, 5e7, 1e8), lr_span=3, batch_span=1)
    return write_results(tmp_path_factory.mktemp("sweep") / "results.jsonl", rows)


@pytest.fixture(scope="module")
def fitted(results, tmp_path_factory):
    """FIT.json and plots from one `qwenjax fit` run (presets' N patched in from the spec table)."""
    out = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qwenjax.scaling, "preset_n_params", QWEN25_N.__getitem__)
        status = qwenjax.cli.main(
            [
                "fit",
                str(results),
                "-o",
                str(out / "FIT.json"),
                "--plots",
                str(out / "plots"),
                "--bootstrap",
                "100",
                "--tolerance",
                "0.0025",
                "--batch-law",
                "ND",
            ]
        )
    assert status == 0
    return out


def test_fit_end_to_end(fitted):
    """Acceptance 3: FIT.json with laws, CIs, conventions, data and regret; the five PNG plots."""
    fit = load_fit(fitted / "FIT.json")
    assert set(fit["laws"]) == {"lr", "batch_tokens"}
    for law in fit["laws"].values():
        assert all(len(c["ci"]) == 2 for c in law["coef"].values())
    assert fit["loss_law"]["formula"] == "L = E + A / N^alpha + B / D^beta"
    assert fit["data"]["cells"] == 9 and fit["data"]["n_params_range"] == [1e6, 4e6]
    assert fit["method"]["tolerance"] == 0.0025 and fit["method"]["batch_law"] == "ND"
    assert fit["regret"]["cells_evaluated"] == 9 and fit["regret"]["max"] < 0.01
    assert "non-embedding" in fit["conventions"]["N"]
    plots = sorted(p.name for p in (fitted / "plots").iterdir())
    assert plots == [
        "batch_sweeps.png",
        "hparam_laws.png",
        "loss_law.png",
        "lr_sweeps.png",
        "predictions.png",
    ]


def test_fit_options(cli, results, tmp_path):
    status, out, err = cli(
        "fit",
        results,
        "-o",
        tmp_path / "FIT.json",
        "--method",
        "smooth",
        "--batch-law",
        "D",
        "--no-loss-law",
        "--bootstrap",
        "20",
        "--loss-column",
        "final_loss",
        "--seed",
        "3",
    )
    assert status == 0 and err == ""
    fit = load_fit(tmp_path / "FIT.json")
    assert fit["loss_law"] is None and fit["laws"]["batch_tokens"]["inputs"] == ["D"]
    assert fit["method"]["optimum"] == "smooth" and fit["data"]["loss_column"] == "final_loss"
    assert "B = b * D^delta" in out and "regret" in out


def test_predict_prints_one_json_object(cli, fitted):
    status, out, err = cli(
        "predict",
        fitted / "FIT.json",
        "--params",
        "494M",
        "--tokens",
        "18T",
        "--seq-len",
        "4096",
        "--multiple-of",
        "64",
    )
    assert status == 0 and err == ""
    result = json.loads(out)
    assert {
        "lr",
        "lr_ci",
        "batch_tokens",
        "batch_tokens_ci",
        "batch_size",
        "loss",
        "loss_ci",
        "warning",
    } <= set(result)
    assert result["batch_size"] % 64 == 0 and result["batch_size"] > 0
    assert "N = 494M is 124x above the largest fitted N (4M)" in result["warning"]
    inside = json.loads(cli("predict", fitted / "FIT.json", "--params", "2M", "--tokens", "50M")[1])
    assert "warning" not in inside and inside["seq_len"] == 4096


def test_predict_preset(cli, fitted):
    """--preset takes N from the preset's shapes (config.param_counts, equal to the model's count_params)."""
    pytest.importorskip("qwenjax.model")
    status, out, _ = cli("predict", fitted / "FIT.json", "--preset", "qwen2.5-0.5b", "--tokens", "18T")
    assert status == 0
    assert json.loads(out)["n_params"] == QWEN25_N["qwen2.5-0.5b"]


def test_malformed_lines_skipped_with_count(cli, results, tmp_path):
    lines = results.read_text().splitlines()
    bad = tmp_path / "results.jsonl"
    bad.write_text("\n".join(lines[:5] + ['{"torn": ', "not json"] + lines[5:]) + "\n")
    status, _, err = cli("fit", bad, "-o", tmp_path / "FIT.json", "--bootstrap", "10", "--no-loss-law")
    assert status == 0
    assert err.count("\n") == 1 and "skipped 2 malformed results line(s) (results.jsonl line 6, 7)" in err
    assert load_fit(tmp_path / "FIT.json")["data"]["skipped_lines"] == 2
    status, _, err = cli("fit", bad, "-o", tmp_path / "FIT2.json", "--strict")
    assert status == 2 and "results.jsonl:6: malformed results line" in err


def _one_line_error(result, match):
    status, out, err = result
    assert status == 2, err
    assert err.startswith("qwenjax: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


def test_bad_results_inputs(cli, tmp_path):
    """Acceptance 4: missing, empty, all-diverged, single-cell results each give one clear line."""
    fit = ("fit", "-o", tmp_path / "FIT.json")
    _one_line_error(cli(*fit, tmp_path / "missing.jsonl"), "results file not found")
    (tmp_path / "empty.jsonl").write_text("")
    _one_line_error(cli(*fit, tmp_path / "empty.jsonl"), "no runs in")
    rows = synthetic_results(n_values=(1e6, 2e6), d_values=(5e7, 1e8), lr_span=1, batch_span=0)
    diverged = [
        {**r, "status": "diverged", "diverged": True, "eval_loss": None, "final_loss": None} for r in rows
    ]
    _one_line_error(
        cli(*fit, write_results(tmp_path / "div.jsonl", diverged)),
        f"none of the {len(rows)} runs can count as an optimum ({len(rows)} diverged",
    )
    single = synthetic_results(n_values=(1e6,), d_values=(5e7,), lr_span=2, batch_span=1)
    _one_line_error(
        cli(*fit, write_results(tmp_path / "one.jsonl", single)),
        "the laws need successful runs at two or more N and two or more D values; found N: 1 value",
    )
    _one_line_error(cli("fit", tmp_path / "one.jsonl"), "required: -o/--output")
    _one_line_error(cli(*fit, tmp_path / "one.jsonl", "--tolerance", "-1"), "--tolerance must be >= 0")
    _one_line_error(cli(*fit, tmp_path / "one.jsonl", "--batch-law", "N"), "invalid choice")
    assert not (tmp_path / "FIT.json").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (("--params", "0", "--tokens", "18T"), "--params must be positive"),
        (("--params=-5M", "--tokens", "18T"), "--params must be positive"),
        (("--params", "494M", "--tokens", "0"), "--tokens must be positive"),
        (("--params", "494X", "--tokens", "18T"), "--params must be a number like 494M"),
        (("--params", "494M", "--tokens", "18 trillion"), "--tokens must be a number like"),
        (
            ("--params", "494M", "--tokens", "18T", "--multiple-of", "0"),
            "--multiple-of must be a positive integer",
        ),
        (("--params", "494M", "--tokens", "18T", "--seq-len", "-1"), "--seq-len must be a positive integer"),
        (("--tokens", "18T"), "one of the arguments --params --preset is required"),
        (("--preset", "qwen2.5-9b", "--tokens", "18T"), "unknown model preset 'qwen2.5-9b'"),
    ],
)
def test_bad_predict_inputs(cli, fitted, args, match):
    if "--preset" in args:
        pytest.importorskip("qwenjax.config")
    _one_line_error(cli("predict", fitted / "FIT.json", *args), match)


def test_bad_fit_file(cli, tmp_path):
    args = ("--params", "1M", "--tokens", "1B")
    _one_line_error(cli("predict", tmp_path / "FIT.json", *args), "fit file not found")
    (tmp_path / "results.jsonl").write_text('{"a": 1}\n{"a": 2}\n')  # a results file by mistake
    _one_line_error(cli("predict", tmp_path / "results.jsonl", *args), "is not valid JSON")
    (tmp_path / "other.json").write_text('{"a": 1}\n')
    _one_line_error(cli("predict", tmp_path / "other.json", *args), "is not a qwenjax fit")


# --- estimators, noise floor, holdout ----------------------------------------------------------------------


def test_cli_lists_the_estimators_without_importing_the_fitter(cli):
    """The parser's names are spelled out in commands/fit.py; they must match the fitter's."""
    import qwenjax.commands.fit as command
    from qwenjax.scaling.hparams import DEFAULT_METHOD, ESTIMATORS

    assert command.ESTIMATORS == ESTIMATORS and command.DEFAULT_METHOD == DEFAULT_METHOD
    with pytest.raises(SystemExit):
        cli("fit", "--help")


def test_fit_help_lists_every_estimator(capsys):
    with pytest.raises(SystemExit):
        qwenjax.cli.main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "{nearopt,smooth,surface,prior}" in out and "--prior JSON" in out and "--holdout SPEC" in out


@pytest.mark.parametrize("method", ["nearopt", "surface"])
def test_fit_holdout_end_to_end(cli, results, tmp_path, monkeypatch, method):
    monkeypatch.setattr(qwenjax.scaling, "preset_n_params", QWEN25_N.__getitem__)  # the spec table
    plots = ("--plots", tmp_path / "plots") if method == "surface" else ()  # plots cost seconds: draw them once
    status, out, err = cli(
        "fit", results, "-o", tmp_path / "FIT.json", "--holdout", "largest", "--method", method,
        "--bootstrap", "30", "--no-loss-law", *plots,
    )  # fmt: skip
    assert status == 0, err
    fit = load_fit(tmp_path / "FIT.json")
    assert fit["method"]["estimator"] == method and fit["holdout"]["estimator"] == method
    held = fit["holdout"]
    assert held["spec"] == "largest" and held["cells_held_out"] == 5 and held["cells_fitted"] == 4
    assert held["mean"] < 0.005 and len(held["per_cell"]) == 5
    assert {"regret", "lr_ratio", "batch_ratio", "lr_covered", "batch_covered", "noise"} <= set(held["per_cell"][0])
    assert fit["noise"]["relative"] is None and "not measured" in fit["noise"]["note"]
    assert "leave-one-cell-out regret: mean" in out and "(noise floor not measured)" in out
    assert "holdout largest: fitted 4 cells, predicted 5 held-out cells: regret mean" in out
    assert "noise floor: not measured" in out and out.count("x the best") == 10
    if plots:
        assert (tmp_path / "plots" / "holdout.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_with_seeds_prints_the_noise_floor(cli, tmp_path):
    rows = synthetic_results(
        n_values=(1e6, 2e6, 4e6), d_values=(2.5e7, 5e7, 1e8), lr_span=2, batch_span=1, seeds=3, noise=0.003
    )
    path = write_results(tmp_path / "seeds.jsonl", rows)
    status, out, err = cli("fit", path, "-o", tmp_path / "FIT.json", "--bootstrap", "20", "--no-loss-law")
    assert status == 0, err
    fit = load_fit(tmp_path / "FIT.json")
    assert fit["noise"]["cells_measured"] == 9 and fit["noise"]["seeds"] == 3
    assert f"noise floor: {fit['noise']['relative']:.2%} of the loss" in out
    assert f"(noise floor {fit['noise']['relative']:.2%})" in out


def test_fit_prior_option(cli, results, tmp_path):
    prior = tmp_path / "prior.json"
    prior.write_text('{"alpha": -0.6, "sd": {"alpha": 0.05}}')
    status, _, err = cli(
        "fit", results, "-o", tmp_path / "FIT.json", "--method", "prior", "--prior", prior, "--bootstrap", "10",
    )  # fmt: skip
    assert status == 0, err
    fit = load_fit(tmp_path / "FIT.json")
    assert fit["method"]["prior"]["mean"]["alpha"] == -0.6 and fit["method"]["prior"]["sd"]["alpha"] == 0.05
    assert fit["laws"]["lr"]["coef"]["alpha"]["value"] == pytest.approx(-0.6, abs=0.15)


def test_bad_holdout_and_prior_inputs(cli, results, tmp_path):
    """A holdout leaving fewer than two N or D values, a malformed one, a prior with a wrong key: one line, exit 2."""
    fit = ("fit", results, "-o", tmp_path / "FIT.json", "--bootstrap", "5")
    _one_line_error(cli(*fit, "--holdout", "N>=2M"), "--holdout 'N>=2M' leaves N: 1 value (1M) and D: 3 values")
    _one_line_error(cli(*fit, "--holdout", "D>=50M"), "--holdout 'D>=50M' leaves N: 3 values (1M, 2M, 4M) and D: 1")
    _one_line_error(cli(*fit, "--holdout", "N>2M"), "--holdout must be 'largest', 'N>=X' or 'D>=Y'")
    _one_line_error(cli(*fit, "--holdout", "N>=1T"), "--holdout 'N>=1T' holds out no cells")
    _one_line_error(
        cli(*fit, "--method", "prior", "--prior", '{"alpah": -0.7}'),
        "--prior: unknown key 'alpah' (allowed: alpha, beta, gamma, delta, sd)",
    )
    _one_line_error(cli(*fit, "--method", "prior", "--prior", '{"sd": {"eta": 1}}'), "unknown key 'sd.eta'")
    _one_line_error(cli(*fit, "--prior", '{"alpha": -0.7}', "--method", "nearopt"), "--prior applies to --method prior")
    _one_line_error(cli(*fit, "--method", "ridge"), "invalid choice: 'ridge'")
    assert not (tmp_path / "FIT.json").exists()
