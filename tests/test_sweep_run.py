"""Running sweeps: local workers and Ray, resume after kill -9, divergence, retries, populations, cooldown forks.

Fast tests use `fake_train` (a stand-in for qwenjax.train.train that writes what the trainer writes); the
end-to-end ones train sweeps/tiny.yaml (8 runs of a 1-layer model) with the real trainer. All sweeps of the
session share one persistent compilation cache, so each compiled shape is built once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qwenjax.sweep import SweepOptions, run_sweep
from qwenjax.sweep.results import REQUIRED_FIELDS, read_lines
from qwenjax.sweep.spec import load_spec
from qwenjax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TINY = ROOT / "sweeps" / "tiny.yaml"


def fake_train(cfg) -> dict:
    """Loss a parabola in log lr (best 4e-3) and log batch (best 8); lr > 0.05 diverges; lr 1e-3 at batch 4
    raises (a failing run)."""
    from qwenjax.run_config import atomic_write_text, save_config

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    lr = cfg.optim.lr
    if lr == 1e-3 and cfg.train.batch_size == 4:
        raise RuntimeError("fake failure\nsecond line")
    diverged = lr > 0.05
    loss = 3 + (math.log2(lr) - math.log2(4e-3)) ** 2 / 10 + (math.log2(cfg.train.batch_size) - 3) ** 2 / 20
    summary = {"complete": True, "final_loss": None if diverged else loss, "diverged": diverged,
               "eval_loss": None if diverged else loss + 0.01, "diverged_step": 3 if diverged else None}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary))
    return summary


def crash_mid_fork(cfg, forks=()) -> dict:
    """The trainer, except that the first fork to save a checkpoint of its own (past the state its parent
    handed over) kills its worker right after that save: a sweep killed mid-fork."""
    from qwenjax.train import train
    from qwenjax.train.checkpoint import Checkpointer

    marker = Path(os.environ["QWENJAX_TEST_FORK_CRASH"])
    if not getattr(Checkpointer, "crash_armed", False):
        save = Checkpointer.save

        def save_then_crash(self, step, state, meta):
            save(self, step, state, meta)
            if meta.get("fork_of") and step > meta["fork_step"] and not marker.exists():
                self.wait()
                marker.touch()
                os._exit(9)

        Checkpointer.save, Checkpointer.crash_armed = save_then_crash, True
    return train(cfg, forks=forks)


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def env(qwenjax_cache, jax_cache):
    """For this module's sweeps and their worker processes: the session's tokenizer/token cache (shared with
    the other tests through conftest's qwenjax_cache), one compilation cache, and this folder importable
    (for `fake_train`)."""
    changes = {"QWENJAX_CACHE": str(qwenjax_cache), "QWENJAX_SWEEP_JAX_CACHE": jax_cache,
               "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    old = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    yield dict(os.environ)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def rows_of(out: Path) -> list[dict]:
    rows, bad = read_lines(out / "results.jsonl")
    assert bad == 0
    return rows


def check_complete(out: Path, planned: int) -> list[dict]:
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line is valid JSON
    assert len(rows) == planned == len({r["run_id"] for r in rows})
    for r in rows:
        for key in REQUIRED_FIELDS:
            assert key in r, key
    return rows


# ---------------------------------------------------------------------------------------------------------
# Fake runs: scheduling, retries, extensions


def test_local_workers_retry_failures_and_extend_edges(tmp_path, env):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "fake", "base": str(ROOT / "configs" / "tiny.yaml"),
        "models": [{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 1}],
        "tokens": [16384], "lr": [1e-3, 2e-3], "batch_size": [4, 8], "max_extensions": 2, "noise_seeds": [1, 2],
        "overrides": {"train.seq_len": 64}}))
    out = tmp_path / "out"
    summary = run_sweep(spec, out, SweepOptions(workers=2, max_retries=1, run_fn="test_sweep_run:fake_train",
                                                live=False))
    rows = check_complete(out, summary["planned_runs"])
    by_point = {(r["lr"], r["batch_size"]): r for r in rows}
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == 2  # tried, retried once, recorded once
    assert failed[0]["error"] == "RuntimeError: fake failure"
    # the best run (2e-3, batch 8) sat on the edge of the ok runs: extended until bracketed
    ext = {(r["lr"], r["batch_size"]) for r in rows if r["grid"] == "extension"}
    assert (0.004, 8) in ext and (0.002, 16) in ext
    assert by_point[(0.004, 8)]["final_loss"] < by_point[(0.002, 8)]["final_loss"]
    assert summary["extension_runs"] == len(ext) and summary["cells_extended"]
    # once settled, the cell's optimum is rerun with each noise seed (and only then)
    noise = sorted((r["lr"], r["batch_size"], r["seed"]) for r in rows if r["grid"] == "noise")
    assert noise == [(0.004, 8, 1), (0.004, 8, 2)]
    assert summary["noise"]["relative"] == 0.0  # fake_train's loss does not depend on the seed
    # rerun: only the failed run is tried again (and fails again); nothing else is trained or appended
    again = run_sweep(spec, out, SweepOptions(workers=2, max_retries=0, run_fn="test_sweep_run:fake_train",
                                              live=False))
    assert again["trained_now"] == 1 and again["planned_runs"] == summary["planned_runs"]
    assert len(rows_of(out)) == len(rows) + 1


# ---------------------------------------------------------------------------------------------------------
# The real trainer


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, env):
    """sweeps/tiny.yaml trained by 2 local workers (shared by the tests below)."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    return out, run_sweep(TINY, out, SweepOptions(workers=2, live=False))


@pytest.mark.slow
def test_tiny_sweep_with_two_local_workers(tiny_sweep):
    out, summary = tiny_sweep
    rows = check_complete(out, 8)
    assert {r["status"] for r in rows if r["lr"] == 3.0} == {"diverged"}  # and the rest finished
    assert all(r["status"] == "ok" and r["final_loss"] < 7 for r in rows if r["lr"] < 1)
    assert all(r["mode"] == "solo" and r["grid"] == "initial" for r in rows)
    for r in rows:
        run_dir = out / r["run_dir"]
        assert (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file()
    assert summary["compile_s"] > 0 and 0 < summary["compile_share"] < 1
    saved = json.loads((out / "summary.json").read_text())
    assert saved["counts"] == {"ok": 6, "diverged": 2}


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path, env):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qwenjax.commands.sweep", str(TINY), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(read_lines(out / "results.jsonl")[0]) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-run
    proc.wait()
    before = {r["run_id"]: r for r in rows_of(out)}
    assert 2 <= len(before) < 8
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = check_complete(out, 8)
    for row in rows:  # finished runs were not trained again
        if row["run_id"] in before:
            assert row == before[row["run_id"]]
    assert "8/8 runs finished" in r.stdout


@pytest.mark.slow
def test_ray_executor_local_instance(tmp_path, env):
    ray = pytest.importorskip("ray")
    out = tmp_path / "out"
    try:
        summary = run_sweep(TINY, out, SweepOptions(executor="ray", ray_num_cpus=2, live=False))
    finally:
        ray.shutdown()
    rows = check_complete(out, 8)
    assert summary["counts"] == {"ok": 6, "diverged": 2}
    assert "ray" in summary["executor"] and {r["mode"] for r in rows} == {"solo"}


@pytest.mark.slow
def test_population_members_equal_their_solo_runs(tiny_sweep, tmp_path, env):
    solo_out, _ = tiny_sweep
    out = tmp_path / "pop"
    spec = load_spec(TINY)
    spec = type(spec)(**{**spec.__dict__, "population": "lr"})
    summary = run_sweep(spec, out, SweepOptions(workers=2, live=False, force_population="population"))
    rows = check_complete(out, 8)
    assert {r["mode"] for r in rows} == {"population"} and summary["modes_now"] == {"population": 8}
    solo = {r["run_id"]: r for r in rows_of(solo_out)}
    for r in rows:  # same configs -> same run ids as the solo sweep
        s = solo[r["run_id"]]
        assert r["status"] == s["status"] and r.get("diverged_step") == s.get("diverged_step")
        pop_curve = read_metrics(out / r["run_dir"] / "metrics.jsonl")
        solo_curve = read_metrics(solo_out / s["run_dir"] / "metrics.jsonl")
        assert [m["step"] for m in pop_curve] == [m["step"] for m in solo_curve]
        for a, b in zip(pop_curve, solo_curve, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        if s["status"] == "ok":
            assert r["final_loss"] == pytest.approx(s["final_loss"], rel=1e-5)
            assert r["eval_loss"] == pytest.approx(s["eval_loss"], rel=1e-5)
        summary_file = json.loads((out / r["run_dir"] / "summary.json").read_text())
        assert summary_file["population"]["size"] == 4 and (out / r["run_dir"] / "config.yaml").is_file()


@pytest.mark.slow
def test_population_probe_and_benchmark(jax_cache):
    from qwenjax.bench_population import benchmark_population
    from qwenjax.run_config import load_config
    from qwenjax.sweep.population import decide
    from qwenjax.sweep.runner import setup_jax

    setup_jax(jax_cache)  # the second measurement loads the steps the first compiled

    cfg = load_config(TINY.parent.parent / "configs" / "tiny.yaml",
                      {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 1,
                       "model.num_attention_heads": 2, "model.num_key_value_heads": 1, "train.seq_len": 32,
                       "train.batch_size": 4})
    bench = benchmark_population(cfg, members=2, steps=2, strategies=("map",))
    assert bench["strategies"]["map"]["ratio"] > 0 and bench["solo_step_s"] > 0 and bench["rounds"] == 3
    assert bench["n_params"] > 0 and bench["best"] == "map"
    d = decide([cfg, cfg.replace(**{"optim.lr": 1e-2})], steps=2, shape_key="k", strategies=("map",))
    assert d["mode"] in ("population", "solo") and d["ratio"] > 0 and d["members"] == 2


@pytest.mark.slow
def test_forked_cooldowns_equal_direct_runs_and_resume_mid_fork(tmp_path, env, monkeypatch):
    """Budgets of 32 and 64 steps (WSD, 1-sqrt, half the steps decaying): the 32-step runs fork from the
    64-step runs at step 16. One fork is killed after its own checkpoint at step 24 and recorded failed; the
    rerun resumes it there. Every fork's result line, loss curve and losses equal those of the run trained
    directly to its budget (the same config, so the same run id); the lr 3.0 family diverges."""
    tree = {"name": "forks", "base": str(ROOT / "configs" / "tiny.yaml"),
            "models": [{"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "num_key_value_heads": 1}],
            "tokens": [8192, 16384], "lr": [6e-3, 3.0], "batch_size": [4], "max_extensions": 0,
            "overrides": {"train.seq_len": 64, "train.log_every": 4, "optim.schedule": "wsd",
                          "optim.decay_shape": "1-sqrt", "optim.decay_fraction": 0.5, "optim.warmup_steps": 3,
                          "eval.batches": 1, "checkpoint.every_steps": 8, "checkpoint.keep": 1}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tree))
    direct_out = tmp_path / "direct"
    run_sweep(spec, direct_out, SweepOptions(workers=1, live=False))
    direct = {r["run_id"]: r for r in check_complete(direct_out, 4)}

    spec.write_text(yaml.safe_dump({**tree, "fork_cooldowns": True}))
    out = tmp_path / "forked"
    monkeypatch.setenv("QWENJAX_TEST_FORK_CRASH", str(tmp_path / "crashed"))
    opts = SweepOptions(workers=1, live=False, max_retries=0, run_fn="test_sweep_run:crash_mid_fork")
    first = run_sweep(spec, out, opts)
    assert (tmp_path / "crashed").exists() and first["counts"].get("failed") == 1
    done_first = {r["run_id"] for r in rows_of(out) if r["status"] != "failed"}
    summary = run_sweep(spec, out, opts)
    assert summary["trained_now"] == 1 and summary["counts"] == {"ok": 2, "diverged": 2}
    latest = {r["run_id"]: r for r in rows_of(out)}
    assert latest.keys() == direct.keys()
    resumed = [r for r in latest.values() if r["run_id"] not in done_first]
    assert len(resumed) == 1 and resumed[0]["fork_step"] == 16 and resumed[0]["lr"] == 6e-3
    for rid, row in latest.items():
        d = direct[rid]
        for key in ("status", "tokens", "steps", "final_loss", "eval_loss", "diverged_step"):
            assert row.get(key) == d.get(key), key
        if row["tokens"] == 8192 and row["lr"] == 6e-3:
            parent = next(r for r in latest.values() if r["tokens"] == 16384 and r["lr"] == 6e-3)
            assert row["fork_of"] == parent["run_id"] and row["fork_step"] == 16
        curve = read_metrics(out / row["run_dir"] / "metrics.jsonl")
        direct_curve = read_metrics(direct_out / d["run_dir"] / "metrics.jsonl")
        assert [(m["step"], m["loss"], m["lr"]) for m in curve] == \
            [(m["step"], m["loss"], m["lr"]) for m in direct_curve]
        assert (out / row["run_dir"] / "config.yaml").is_file() and (out / row["run_dir"] / "summary.json").is_file()
    forks = summary["forks"]
    saved = sum(r.get("fork_step") or 0 for r in latest.values()) * 4 * 64
    assert forks["runs"] >= 1 and forks["tokens_without_forks"] - forks["tokens_trained"] == saved > 0
    assert json.loads((out / "summary.json").read_text())["forks"] == forks
