"""Preemption: SIGTERM (what a TPU/GPU scheduler sends) or SIGINT stops `qwenjax train` after its current step
with a complete checkpoint there, one line saying where, and exit 143/130; rerunning the same command ends
bitwise identical to an uninterrupted run. A sweep forwards the signal to its workers and a rerun completes
the interrupted runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY, subprocess_env, tiny_overrides
from test_resume import _final_state

from qwenjax import signals
from qwenjax.run_config import load_config, model_config
from qwenjax.sweep import SweepOptions, run_sweep
from qwenjax.sweep.results import read_lines
from qwenjax.train import train
from qwenjax.train.metrics import read_metrics

COMMON = ("train.steps=60", "train.log_every=1", "checkpoint.every_steps=1000", "eval.batches=1")
CLI = [sys.executable, "-m", "qwenjax.cli"]


def start_train(cache: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "train", str(TINY), *tiny_overrides(cache, run_dir, *COMMON, *extra)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 240) -> None:
    """Poll metrics.jsonl until `steps` steps are logged (the run is in its loop)."""
    deadline = time.time() + timeout
    while len(read_metrics(run_dir / "metrics.jsonl")) < steps:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"fewer than {steps} steps after {timeout} s"
        time.sleep(0.05)


def interrupt(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_handlers_record_or_raise_and_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(signals.Interrupted) as e, signals.stop_signals(immediate="stopped ({signal})"):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs between bytecodes
    assert (str(e.value), e.value.exit_code) == ("stopped (SIGINT)", 130)
    with signals.stop_signals(immediate="stopped ({signal})"), signals.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a repeat is ignored
        time.sleep(0.1)
        assert signals.requested() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.fixture(scope="module")
def reference(tiny_config, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    summary = train(load_config(TINY, tiny_overrides(tiny_config.data.cache_dir, run_dir, *COMMON)))
    return run_dir, summary


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_and_rerun_is_bitwise_identical(signum, code, tiny_config, tiny_data, reference, tmp_path):
    cache, run_dir = tiny_config.data.cache_dir, tmp_path / "run"
    proc = start_train(cache, run_dir)
    try:
        wait_for_steps(proc, run_dir, 5)
        rc, err = interrupt(proc, signum)
    finally:
        proc.kill()
    assert rc == code, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("qwenjax: interrupted")]
    assert len(lines) == 1, err[-3000:]
    m = re.fullmatch(rf"qwenjax: interrupted \({signal.Signals(signum).name}\) at step (\d+); checkpoint "
                     r"saved in (.*); rerun the same command to resume", lines[0])
    assert m, lines[0]
    step = int(m.group(1))
    assert 5 <= step < 60 and Path(m.group(2)) == run_dir / "ckpt" / str(step)
    assert (run_dir / "ckpt" / str(step)).is_dir() and not (run_dir / "summary.json").exists()
    assert not (run_dir / ".lock").exists()

    rerun = subprocess.run([*CLI, "train", str(TINY), *tiny_overrides(cache, run_dir, *COMMON)],
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming {run_dir} from step {step}" in rerun.stderr
    ref_dir, ref_summary = reference
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}
    assert losses == {r["step"]: r["loss"] for r in read_metrics(ref_dir / "metrics.jsonl")}
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_loss", "eval_loss", "steps_completed", "tokens"):
        assert summary[key] == ref_summary[key], key
    model_cfg = model_config(tiny_config, vocab_size=tiny_data.vocab_size)
    (step_a, a), (step_b, b) = _final_state(run_dir, model_cfg), _final_state(ref_dir, model_cfg)
    assert step_a == step_b == 60
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_signal_without_checkpoints_says_nothing_was_saved(tiny_config, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train(tiny_config.data.cache_dir, run_dir, "checkpoint.enabled=false")
    try:
        wait_for_steps(proc, run_dir, 2)
        rc, err = interrupt(proc, signal.SIGTERM)
    finally:
        proc.kill()
    assert rc == 143, err[-3000:]
    assert re.search(r"^qwenjax: interrupted \(SIGTERM\) at step \d+; nothing was saved", err, re.M), err
    assert not (run_dir / "ckpt").exists()


def slow_fake_train(cfg) -> dict:
    """A stand-in trainer that 'checkpoints' each step to RUN_DIR/step and stops on a signal as the trainer
    does (after the current step, `signals.Interrupted`); 40 steps of 50 ms."""
    from qwenjax import signals
    from qwenjax.lock import DirLock
    from qwenjax.run_config import atomic_write_text, save_config

    run_dir = Path(cfg.run_dir)
    with DirLock(run_dir, "run_dir"), signals.stop_signals():
        save_config(cfg, run_dir / "config.yaml")
        progress = run_dir / "step"
        step = int(progress.read_text()) if progress.is_file() else 0
        resumed = step
        while step < 40:
            time.sleep(0.05)
            step += 1
            progress.write_text(str(step))
            if signals.requested() and step < 40:
                raise signals.Interrupted(signals.requested(), f"interrupted at step {step}")
        summary = {"complete": True, "final_loss": 3.0, "eval_loss": 3.0, "diverged": False,
                   "resumed_from": resumed}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary))
        return summary


def test_sweep_sigterm_records_interrupted_runs_and_rerun_completes_them(tmp_path, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({
        "name": "preempt", "base": str(TINY),
        "models": [{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 1}],
        "tokens": [20480], "lr": [1e-3, 4e-3], "batch_size": [8], "max_extensions": 0}))
    out = tmp_path / "sweep"
    tests = str(Path(__file__).resolve().parent)
    env = subprocess_env(QWENJAX_SWEEP_RUN_FN="test_preempt:slow_fake_train")
    env["PYTHONPATH"] = os.pathsep.join([tests, env["PYTHONPATH"]])
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])  # the rerun's workers import slow_fake_train too
    proc = subprocess.Popen([*CLI, "sweep", str(spec), "--out", str(out), "--workers", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(list((out / "runs").glob("*/step"))) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.05)
        rc, err = interrupt(proc, signal.SIGTERM)
    finally:
        proc.kill()
    assert rc == 143, err[-3000:]
    assert re.search(r"^qwenjax: sweep interrupted \(SIGTERM\): 2 runs? interrupted", err, re.M), err[-3000:]
    rows = read_lines(out / "results.jsonl")[0]
    assert sorted(r["status"] for r in rows) == ["interrupted", "interrupted"]
    assert not (out / ".lock").exists()

    summary = run_sweep(spec, out, SweepOptions(workers=1, live=False, max_retries=0,
                                                run_fn="test_preempt:slow_fake_train"))
    assert summary["counts"] == {"ok": 2}
    for run in (out / "runs").iterdir():
        assert json.loads((run / "summary.json").read_text())["resumed_from"] > 0  # continued, not restarted
