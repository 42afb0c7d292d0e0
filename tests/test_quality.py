"""Fits that say how good they are (issue 10, item 4), FIT.json validated on load and results lines that never
sink a fit (item 3): `scaling.quality` flags on synthetic good and bad fits, `predict` repeating them and
refusing an unusable law without --force, the loss column never switched silently, and one error line for
every malformed FIT.json or results line."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

import qwenjax.cli
from qwenjax.errors import UserError
from qwenjax.scaling import load_fit, load_results, make_fit, save_fit
from qwenjax.scaling.quality import assess, check_usable
from qwenjax.scaling.synthetic import synthetic_results, write_results

PREDICT = ("--params", "2M", "--tokens", "50M")


@pytest.fixture(scope="module")
def rows():
    return synthetic_results(n_values=(1e6, 2e6, 4e6), d_values=(2.5e7, 5e7, 1e8), lr_span=3, batch_span=1)


@pytest.fixture(scope="module")
def good(rows, tmp_path_factory):
    """A FIT.json of clean synthetic data: (path, fit dict)."""
    path = tmp_path_factory.mktemp("fit") / "FIT.json"
    df = load_results(write_results(path.parent / "results.jsonl", rows))
    save_fit(make_fit(df, bootstrap=60), path)
    return path, load_fit(path)


@pytest.fixture
def cli(capsys):
    def run(*argv):
        status = qwenjax.cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def _one_line_error(result, match):
    status, _, err = result
    assert status == 2, err
    assert err.startswith("qwenjax: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


def _write(tmp_path, fit, name="FIT.json"):
    path = tmp_path / name
    path.write_text(json.dumps(fit))
    return path


def test_clean_fit_has_no_unusable_law(good):
    quality = good[1]["quality"]
    assert quality["status"] in ("ok", "warning") and set(quality["laws"]) == {"lr", "batch_tokens", "loss_law"}
    assert "unusable" not in quality["laws"].values()
    assert quality["rules"]["wide_span"] == 10 and quality["rules"]["exponent_bounds"] == [0.05, 2]
    assert check_usable(good[1]) is None or "fit quality" in check_usable(good[1])


def test_loss_law_at_bound_is_unusable_and_predict_refuses_it(good, cli, tmp_path):
    fit = copy.deepcopy(good[1])
    fit["loss_law"]["coef"]["E"]["value"] = 8.5e-13
    fit["loss_law"]["coef"]["beta"]["value"] = 2.5
    fit.pop("quality")
    quality = assess(fit)
    codes = {(f["code"], f["law"], f["severity"]) for f in quality["flags"]}
    assert ("loss_law_at_bound", "loss_law", "unusable") in codes
    assert quality["laws"]["loss_law"] == "unusable" and quality["status"] == "unusable"
    assert sum(f["code"] == "loss_law_at_bound" for f in quality["flags"]) == 2  # E and beta, each with numbers
    with pytest.raises(UserError, match="loss law flagged unusable"):
        check_usable(fit)
    assert check_usable(fit, uses=("lr", "batch_tokens")).startswith("fit quality unusable")
    fit["quality"] = quality
    path = _write(tmp_path, fit)
    _one_line_error(cli("predict", path, *PREDICT), "--force")
    status, out, err = cli("predict", path, *PREDICT, "--force")
    assert status == 0 and json.loads(out)["lr"] > 0
    assert err.count("\n") == 1 and err.startswith("qwenjax: warning: fit quality unusable") and "E = 8.5e-13" in err


def test_old_fit_without_quality_is_assessed_on_use(good, tmp_path, cli):
    fit = copy.deepcopy(good[1])
    fit.pop("quality")
    fit["loss_law"]["coef"]["alpha"]["value"] = 0.01
    _one_line_error(cli("predict", _write(tmp_path, fit), *PREDICT), "alpha = 0.01 is outside (0.05, 2)")


def test_wide_batch_interval_is_unusable_and_spanning_exponent_warns(good):
    fit = copy.deepcopy(good[1])
    law = fit["laws"]["batch_tokens"]
    rng = np.random.default_rng(0)
    samples = np.asarray(law["bootstrap"]["samples"])
    samples[:, 0] += rng.normal(0, 5.0, len(samples))  # the prefactor scattered over e^+-10: > 100x
    law["bootstrap"]["samples"] = samples.tolist()
    fit["laws"]["lr"]["coef"]["beta"].update(value=-0.08, ci=[-0.22, 0.13])
    quality = assess(fit)
    wide = [f for f in quality["flags"] if f["code"] == "wide_prediction" and f["law"] == "batch_tokens"]
    assert wide and wide[0]["severity"] == "unusable" and wide[0]["values"]["span"] > 100
    assert quality["laws"]["batch_tokens"] == "unusable"
    spans = [f for f in quality["flags"] if f["code"] == "exponent_spans_zero"]
    assert spans and spans[0]["law"] == "lr" and spans[0]["values"]["ci"] == [-0.22, 0.13]
    assert quality["laws"]["lr"] == "warning"


def test_nan_eval_loss_rows_switch_the_column_with_a_count(rows, tmp_path, cli):
    broken = [dict(r) for r in rows]
    ok = [r for r in broken if r["status"] == "ok"]
    for r in ok[:40]:
        r["eval_loss"] = math.nan
    path = write_results(tmp_path / "results.jsonl", broken)
    df = load_results(path)
    assert df.attrs["loss_column"] == "final_loss"
    assert df.attrs["loss_column_switch"]["rows"] == 40 and df.attrs["loss_column_switch"]["of"] == len(ok)
    fit = make_fit(df, bootstrap=20, loss_law=False)
    flag = next(f for f in fit["quality"]["flags"] if f["code"] == "loss_column_switched")
    assert flag["values"]["rows"] == 40 and "40 ok run(s) have no finite eval_loss" in flag["message"]
    # the explicit column: those runs are dropped, and counted
    dropped = load_results(path, loss_column="eval_loss")
    assert dropped.attrs["dropped"]["rows"] == 40 and int(dropped["valid"].sum()) == len(ok) - 40
    fit = make_fit(dropped, bootstrap=20, loss_law=False)
    flag = next(f for f in fit["quality"]["flags"] if f["code"] == "rows_dropped")
    assert flag["values"]["rows"] == 40
    status, out, err = cli("fit", path, "-o", tmp_path / "FIT.json", "--bootstrap", "20", "--no-loss-law")
    assert status == 0 and "loss_column_switched" in out and "quality: warning" in out
    assert load_fit(tmp_path / "FIT.json")["data"]["loss_column_switch"]["rows"] == 40


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda f: f.pop("laws"), "laws is missing"),
        (lambda f: f["laws"].pop("lr"), "laws.lr is missing"),
        (lambda f: f["laws"]["lr"].pop("log_coef"), "laws.lr.log_coef is missing"),
        (lambda f: f["laws"]["lr"].update(log_coef=["a", 1, 2]), "laws.lr.log_coef must hold finite numbers"),
        (lambda f: f["laws"]["lr"].update(log_coef=[math.nan, 1, 2]), "laws.lr.log_coef must hold finite"),
        (lambda f: f["laws"]["lr"].update(log_coef=[1, 2]), "laws.lr.log_coef must be a list of 3 numbers"),
        (lambda f: f["laws"]["batch_tokens"].update(inputs="ND"), "laws.batch_tokens.inputs must be a list"),
        (lambda f: f["laws"]["lr"]["bootstrap"].update(samples=[[1, 2]]), "laws.lr.bootstrap.samples"),
        (lambda f: f["laws"].update(lr=[]), "laws.lr must be a mapping"),
        (lambda f: f["data"].update(tokens_range=[0, "x"]), "data.tokens_range"),
        (lambda f: f["loss_law"]["theta"].update(e="1"), "loss_law.theta"),
        (lambda f: f["loss_law"]["coef"].pop("E"), "loss_law.coef.E is missing"),
        (lambda f: f.update(quality={"status": "great"}), "quality must hold a status"),
    ],
)
def test_malformed_fit_file_is_one_line(good, tmp_path, cli, mutate, key):
    fit = copy.deepcopy(good[1])
    mutate(fit)
    path = _write(tmp_path, fit)
    with pytest.raises(UserError, match="FIT.json: " + key.split(" ")[0]):
        load_fit(path)
    _one_line_error(cli("predict", path, *PREDICT), key)
    _one_line_error(cli("train", "train.steps=1", "--hparams", path), key)


@pytest.mark.parametrize(
    "line, reason",
    [
        ("[" * 100_000, "recursion"),
        (json.dumps({"n_params": 10**400}), "n_params"),
        (b'{"n_params": "\xff"}', "utf-8"),
        ("run_id", "run_id"),
        ("seq_len", "seq_len"),
        ("seed", "seed"),
    ],
)
def test_malformed_results_line_strict_and_lenient(rows, tmp_path, line, reason):
    good_lines = [json.dumps(r).encode() for r in rows]
    if line in ("run_id", "seq_len", "seed"):
        line = json.dumps({**rows[0], line: [1, 2] if line != "seq_len" else "long"})
    bad = line if isinstance(line, bytes) else line.encode()
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join(good_lines[:3] + [bad] + good_lines[3:]) + b"\n")
    df = load_results(path)
    assert df.attrs["skipped_lines"] == 1 and df.attrs["skipped_at"][str(path)] == [4]
    with pytest.raises(UserError, match=r"r\.jsonl:4: malformed results line") as e:
        load_results(path, strict=True)
    assert "\n" not in str(e.value) and reason.lower() in str(e.value).lower()


def test_fit_outputs_checked_before_fitting(rows, tmp_path, cli, monkeypatch):
    results = write_results(tmp_path / "results.jsonl", rows)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr("qwenjax.scaling.make_fit", lambda *a, **k: pytest.fail("fitted before checking"))
    _one_line_error(cli("fit", results, "-o", tmp_path / "afile" / "FIT.json"), "is a file, not a directory")
    _one_line_error(cli("fit", results, "-o", tmp_path), "is a directory")
    _one_line_error(cli("fit", results, "-o", tmp_path / "FIT.json", "--plots", tmp_path / "afile"), "--plots")
    _one_line_error(cli("fit", results, "-o", tmp_path / "FIT.json", "--plots", tmp_path / "afile" / "p"),
                    "is a file, not a directory")
    assert not (tmp_path / "FIT.json").exists()


def test_sweep_around_a_malformed_fit_is_one_error(good, tmp_path):
    from qwenjax.sweep.adaptive import Prior  # the sweep's `{around: FIT.json}` grids read the fit here

    fit = copy.deepcopy(good[1])
    fit["laws"]["lr"]["log_coef"] = "0.1"
    with pytest.raises(UserError, match="FIT.json: laws.lr.log_coef must be a list"):
        Prior(str(_write(tmp_path, fit)))
