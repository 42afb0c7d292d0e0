"""The fitter on this project's own CPU-ladder results, and `qwenjax train --hparams` on the FIT.json it writes
(no fakes: the real sweep results file, the real fit, the real prediction, a real tiny training run)."""

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from qwenjax import cli
from qwenjax.scaling import load_fit, predict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "sweeps" / "results" / "cpu-ladder.jsonl"


@pytest.mark.slow
def test_fit_cpu_ladder_then_train_with_hparams(tiny_config, tiny_data, tmp_path, capsys):
    fit_path, plots = tmp_path / "FIT.json", tmp_path / "plots"
    assert cli.main(["fit", str(RESULTS), "-o", str(fit_path), "--plots", str(plots), "--bootstrap", "50",
                     "--holdout", "largest"]) == 0
    fit = json.loads(fit_path.read_text())
    assert fit["data"]["cells"] == 15 and fit["data"]["runs"] == len(RESULTS.read_text().splitlines())
    # the ladder's promise (issue: predictions that hold): held-out cells cost little, and the noise is measured
    assert fit["noise"]["cells_measured"] == 15 and fit["noise"]["seeds"] >= 3
    assert fit["method"]["optimum"] == "smooth"  # the default, chosen by held-out regret (docs/scaling.md)
    assert fit["regret"]["mean"] <= 0.005 and fit["regret"]["max"] <= 0.015
    assert fit["holdout"]["cells_held_out"] == 7 and fit["holdout"]["mean"] <= 0.01
    assert fit["landscape"]["ok"]  # every cell bends; the best loss falls with N at every D and with D at every N
    assert {"lr_sweeps.png", "hparam_laws.png", "holdout.png"} <= {p.name for p in plots.iterdir()}

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_config.data.cache_dir, run_dir, "train.steps=4", "eval.batches=1")
    assert cli.main(["train", str(ROOT / "configs" / "tiny.yaml"), *overrides, "--hparams", str(fit_path)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    hp = summary["hparams"]
    expected = predict(load_fit(fit_path), hp["n_params"], hp["tokens"], seq_len=64)
    assert summary["lr"] == pytest.approx(expected["lr"]) and summary["batch_size"] == expected["batch_size"]
    assert hp["source"] == str(fit_path) and hp["overridden"]["train.steps"]["used"] == 4
