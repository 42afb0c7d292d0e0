"""The fitter on this project's own CPU-ladder results, and `qwenjax train --hparams` on the FIT.json it writes
(no fakes: the real sweep results file, the real fit, the real prediction, a real tiny training run); and the
planned D of `--hparams` and `train.tokens` (issue 10, item 5) on a synthetic fit, without training."""

import copy
import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from qwenjax import cli
from qwenjax.errors import UserError
from qwenjax.hparams import apply_hparams, explicit_overrides, steps_for_tokens
from qwenjax.run_config import load_config, parse_overrides, planned_tokens
from qwenjax.scaling import load_fit, load_results, make_fit, predict, save_fit
from qwenjax.scaling.synthetic import synthetic_results, write_results

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
    # what the committed ladder's quality says (docs/scaling.md): warnings only, no law unusable
    assert fit["quality"]["status"] == "warning" and "unusable" not in fit["quality"]["laws"].values()
    assert {f["code"] for f in fit["quality"]["flags"]} <= {"exponent_spans_zero", "wide_interval"}
    assert {"lr_sweeps.png", "hparam_laws.png", "holdout.png"} <= {p.name for p in plots.iterdir()}

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_config.data.cache_dir, run_dir, "train.steps=4", "eval.batches=1")
    assert cli.main(["train", str(ROOT / "configs" / "tiny.yaml"), *overrides, "--hparams", str(fit_path)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    hp = summary["hparams"]
    expected = predict(load_fit(fit_path), hp["n_params"], hp["tokens"], seq_len=64)
    assert summary["lr"] == pytest.approx(expected["lr"]) and summary["batch_size"] == expected["batch_size"]
    assert hp["source"] == str(fit_path) and hp["overridden"] == {}
    # D planned from the command line's steps (4 x the config's 32 sequences x 64), then trained at the new batch
    assert hp["tokens_assumed"] == 4 * 32 * 64 and hp["quality"] == "warning"
    assert abs(summary["tokens"] - hp["tokens_assumed"]) <= summary["batch_size"] * 64 / 2


# --- the planned D (no training) ---------------------------------------------------------------------------

TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def fit_file(tmp_path_factory):
    """A FIT.json of synthetic results around the tiny model's size (no law unusable)."""
    out = tmp_path_factory.mktemp("fit")
    rows = synthetic_results(n_values=(2e5, 4e5, 8e5), d_values=(1e6, 2e6, 4e6), lr_span=3, batch_span=1,
                             seq_len=64)
    fit = make_fit(load_results(write_results(out / "results.jsonl", rows)), bootstrap=40)
    assert fit["quality"]["status"] != "unusable"
    return save_fit(fit, out / "FIT.json")


def _apply(fit_file, *overrides, force=False):
    tree = parse_overrides(list(overrides))
    return apply_hparams(load_config(TINY, tree), fit_file, explicit_overrides(tree), num_devices=1, force=force)


def test_hparams_recomputes_steps_for_the_planned_tokens(fit_file):
    cfg, notes = _apply(fit_file, "train.steps=5")
    hp = cfg.hparams
    assert hp["tokens_assumed"] == 5 * 32 * 64  # D from the command line's steps at the config's batch
    assert cfg.train.batch_size == hp["prediction"]["batch_size"]
    assert cfg.train.steps == steps_for_tokens(5 * 32 * 64, cfg.train.batch_size, 64)
    assert abs(planned_tokens(cfg) - hp["tokens_assumed"]) <= cfg.train.batch_size * 64 / 2
    assert any("trains" in n and f"D = {5 * 32 * 64:,}" in n for n in notes)
    # an explicit batch wins, and with the steps it plans D
    cfg, _ = _apply(fit_file, "train.steps=5", "train.batch_size=4")
    assert cfg.train.batch_size == 4 and cfg.train.steps == 5 and cfg.hparams["tokens_assumed"] == 5 * 4 * 64
    assert cfg.hparams["overridden"]["train.batch_size"]["used"] == 4


def test_hparams_with_train_tokens(fit_file):
    cfg, _ = _apply(fit_file, "train.tokens=100000")
    assert cfg.hparams["tokens_assumed"] == 100_000 and cfg.train.tokens == 100_000
    assert cfg.train.steps == steps_for_tokens(100_000, cfg.train.batch_size, 64)
    assert predict(load_fit(fit_file), cfg.hparams["n_params"], 100_000, seq_len=64)["batch_size"] == \
        cfg.train.batch_size


def test_train_tokens_without_hparams(tmp_path):
    cfg = load_config(TINY, ["train.tokens=2e5"])
    assert cfg.train.steps == steps_for_tokens(2e5, 32, 64) == 98
    cfg = load_config(TINY, ["train.tokens=2e5", "train.batch_size=16"])
    assert cfg.train.steps == 195
    # a later layer's steps replace an earlier layer's tokens, and the other way round
    (tmp_path / "child.yaml").write_text(f"base: {TINY}\ntrain:\n  tokens: 409600\n")
    assert load_config(tmp_path / "child.yaml").train.steps == 200 * 409600 // 409600
    assert load_config(tmp_path / "child.yaml", ["train.steps=3"]).train.tokens is None
    # a resolved config (steps and tokens that agree) loads again, e.g. a run's own config.yaml
    (tmp_path / "both.yaml").write_text(f"base: {TINY}\ntrain:\n  tokens: 409600\n  steps: 200\n")
    assert load_config(tmp_path / "both.yaml").train.steps == 200
    # a batch change keeps D; an explicit steps change drops the plan (a cooldown fork)
    cfg = load_config(TINY, ["train.tokens=409600"])
    assert cfg.replace(**{"train.batch_size": 16}).train.steps == 400
    assert cfg.replace(**{"train.steps": 7}).train.tokens is None


def test_train_steps_and_tokens_both_given_is_one_error(tmp_path, capsys):
    with pytest.raises(UserError, match="both given in the command-line overrides"):
        load_config(TINY, ["train.steps=5", "train.tokens=1e5"])
    (tmp_path / "both.yaml").write_text(f"base: {TINY}\ntrain:\n  tokens: 100000\n  steps: 5\n")
    with pytest.raises(UserError, match=r"train.steps \(5\) and train.tokens \(100000\) are both given in .*both"):
        load_config(tmp_path / "both.yaml")
    assert cli.main(["train", str(TINY), "train.steps=5", "train.tokens=1e5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give one of them" in err


def test_hparams_refuses_an_unusable_fit_unless_forced(fit_file, tmp_path):
    fit = copy.deepcopy(load_fit(fit_file))
    fit["loss_law"]["coef"]["E"]["value"] = 1e-12
    fit.pop("quality")  # an old FIT.json: assessed on use
    bad = tmp_path / "FIT.json"
    bad.write_text(json.dumps(fit))
    with pytest.raises(UserError, match="loss law flagged unusable .*--force"):
        _apply(bad, "train.steps=5")
    cfg, notes = _apply(bad, "train.steps=5", force=True)
    assert notes[0].startswith("qwenjax: warning: fit quality unusable") and cfg.hparams["forced"]
