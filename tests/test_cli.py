"""The CLI's small promises: --version, train --print-config, outputs checked before work starts, the
train.wandb switch, and a sweep's exit status (1 with each failed run named; --dry-run catches a batch that
does not split over the devices)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env
from test_sweep_spec import write_spec

from qwenjax.cli import main
from qwenjax.run_config import config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwenjax: error: "), err
    return err[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's version action, as --help
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"qwenjax {importlib.metadata.version('qwenjax')}"


def test_print_config_is_the_resolved_config_and_trains_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("qwenjax.train.train", lambda cfg: pytest.fail("--print-config trained"))
    run_dir = tmp_path / "run"
    assert main(["train", TINY, "train.steps=7", f"run_dir={run_dir}", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["run_dir"] == str(run_dir)
    assert printed == config_to_dict(load_config(TINY, ["train.steps=7", f"run_dir={run_dir}"]))
    assert not run_dir.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "exists and is not a directory"),
    (lambda p: (p.parent / "blocker").write_text("x"), "is a file"),
])
def test_train_refuses_an_unusable_run_dir_before_starting(capsys, tmp_path, monkeypatch, make, message):
    monkeypatch.setattr("qwenjax.train.train", lambda cfg: pytest.fail("train() was reached"))
    run_dir = tmp_path / "run"
    make(run_dir)
    target = run_dir if "not a directory" in message else tmp_path / "blocker" / "run"
    assert main(["train", TINY, f"run_dir={target}"]) == 2
    assert message in _error_line(capsys)


def test_wandb_switch(capsys, tmp_path, monkeypatch):
    from qwenjax.train.metrics import wandb_enabled

    assert load_config(TINY, ["train.wandb=true"]).train.wandb == "true"
    assert load_config(TINY, []).train.wandb == "auto"
    monkeypatch.setenv("QWENJAX_WANDB", "1")
    assert wandb_enabled("auto") and not wandb_enabled("false") and wandb_enabled("true")
    monkeypatch.delenv("QWENJAX_WANDB")
    assert not wandb_enabled("auto") and wandb_enabled("auto", asked=True)
    assert main(["train", TINY, "train.wandb=maybe", "--print-config"]) == 2
    assert "train.wandb must be auto, true or false" in _error_line(capsys)
    if importlib.util.find_spec("wandb") is None:
        monkeypatch.setattr("qwenjax.train.train", lambda cfg: pytest.fail("train() was reached"))
        assert main(["train", TINY, "train.wandb=true", f"run_dir={tmp_path / 'r'}"]) == 2
        assert "wandb is not installed" in _error_line(capsys)


def test_sweep_output_folder_checked_first(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert main(["sweep", str(write_spec(tmp_path)), "--out", str(tmp_path / "file" / "o"), "--dry-run",
                 "--no-probe"]) == 2
    assert "is a file" in _error_line(capsys)


def test_dry_run_checks_batch_against_the_devices(capsys, tmp_path, monkeypatch):
    spec = str(write_spec(tmp_path, batch_size=[3, 4]))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert main(["sweep", spec, "--out", str(tmp_path / "o"), "--dry-run", "--no-probe"]) == 2
    line = _error_line(capsys)
    assert "train.batch_size (3)" in line and "data-parallel size mesh.data x mesh.fsdp = 2 on 2 devices" in line
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert main(["sweep", spec, "--out", str(tmp_path / "o"), "--dry-run", "--no-probe"]) == 0


def test_sweep_with_a_failed_run_exits_1_and_names_it(tmp_path):
    """fake_train fails lr 1e-3 at batch 4: the other runs finish, the exit status is 1, and stderr ends with
    one line per failed run: its id and its error."""
    spec = write_spec(tmp_path, max_extensions=0)
    env = subprocess_env(QWENJAX_SWEEP_RUN_FN="test_sweep_run:fake_train")
    env["PYTHONPATH"] = f"{ROOT / 'tests'}:{env['PYTHONPATH']}"
    r = subprocess.run([sys.executable, "-m", "qwenjax.commands.sweep", str(spec), "--out", str(tmp_path / "o"),
                        "--max-retries", "0"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 1, r.stderr
    assert "3 ok, 0 diverged, 1 failed" in r.stdout
    failed = [line for line in r.stderr.splitlines() if line.startswith("qwenjax: failed: ")]
    assert len(failed) == 1 and failed[0].endswith(": RuntimeError: fake failure"), r.stderr
