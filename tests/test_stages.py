"""Staged training (`stages:`): configs/long-tiny.yaml trains 256 tokens at RoPE base 1e4, then 1024 at 1e5 in
one run directory; summary.json lists both; a kill -9 in stage 2 resumes bitwise; bad stage lists are one
line and exit 2; the short rows of a length mix never attend past short_len tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml
from conftest import CONFIGS, TINY, TRAIN_SCRIPT, subprocess_env, tiny_overrides
from test_resume import _final_state

from qwenjax.data.batches import pack_windows
from qwenjax.data.length_mix import cut_documents, short_rows
from qwenjax.model_io import load_config as load_model_config
from qwenjax.run_config import load_config, model_config
from qwenjax.train import train
from qwenjax.train.metrics import read_metrics

LONG_TINY = CONFIGS / "long-tiny.yaml"
COMMON = ("train.batch_size=2",)  # 2 x 1024 tokens a step: the file stays well under a minute once compiled


def _cfg(cache, run_dir, *extra):
    return load_config(LONG_TINY, tiny_overrides(cache, run_dir, *COMMON, *extra))


@pytest.fixture(scope="module")
def reference(tiny_config, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stages") / "reference"
    return run_dir, train(_cfg(tiny_config.data.cache_dir, run_dir))


def test_staged_run_records_each_stage(tiny_config, reference):
    run_dir, summary = reference
    assert [s["name"] for s in summary["stages"]] == ["short", "long"]
    short, long = summary["stages"]
    assert (short["config"]["seq_len"], short["config"]["rope_theta"]) == (256, 1e4)
    assert (long["config"]["seq_len"], long["config"]["rope_theta"]) == (1024, 1e5)
    assert long["config"]["length_mix"] == {"full": 0.4, "short": 0.6, "short_len": 256}
    assert long["config"]["resume_optimizer"] is True
    assert [s["steps_completed"] for s in summary["stages"]] == [4, 12]
    assert [s["tokens"] for s in summary["stages"]] == [4 * 2 * 256, 12 * 2 * 1024]
    assert summary["tokens"] == 4 * 2 * 256 + 12 * 2 * 1024 and summary["seq_len"] == 1024
    assert all(s["final_loss"] is not None and s["wall_s"] > 0 for s in summary["stages"])
    # stage 2 runs with its own seq_len and RoPE base: its config, its step (compiled for it), its model
    saved = yaml.safe_load((run_dir / "stages" / "1" / "config.yaml").read_text())
    assert saved["train"]["seq_len"] == 1024 and saved["model"]["rope_theta"] == 1e5
    assert saved["model"]["init_from"] == str(run_dir / "stages" / "0")
    assert long["compile_s"] > 0  # a new executable for T = 1024 and the new base
    assert read_metrics(run_dir / "stages" / "1" / "metrics.jsonl")[-1]["tokens"] == 12 * 2 * 1024
    assert load_model_config(run_dir / "model").rope_theta == 1e5  # RUN_DIR/model = the last stage's
    first2 = read_metrics(run_dir / "stages" / "1" / "metrics.jsonl")[0]["loss"]
    assert abs(first2 - short["final_loss"]) < 0.5  # stage 2 starts where stage 1 ended
    # a finished staged run is a no-op
    assert train(_cfg(tiny_config.data.cache_dir, run_dir)) == summary


@pytest.mark.slow
def test_kill_9_in_stage_2_then_rerun_is_bitwise_identical(tiny_config, tiny_data, reference, tmp_path):
    cache, killed = tiny_config.data.cache_dir, tmp_path / "killed"
    args = [sys.executable, "-c", TRAIN_SCRIPT, str(LONG_TINY), *tiny_overrides(cache, killed, *COMMON)]
    proc = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (killed / "stages" / "1" / "ckpt" / "2").is_dir():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no stage-2 checkpoint after 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "stages" / "1" / "summary.json").exists(), "stage 2 finished before it could be killed"
    assert (killed / "stages" / "0" / "summary.json").exists()

    resumed = train(_cfg(cache, killed))
    ref_dir, reference_summary = reference
    for i in ("0", "1"):
        got = {r["step"]: r["loss"] for r in read_metrics(killed / "stages" / i / "metrics.jsonl")}
        want = {r["step"]: r["loss"] for r in read_metrics(ref_dir / "stages" / i / "metrics.jsonl")}
        assert got == want, i  # every step, bitwise
    for key in ("final_loss", "eval_loss", "tokens", "steps_completed"):
        assert resumed[key] == reference_summary[key], key
    model_cfg = model_config(load_config(killed / "stages" / "1" / "config.yaml"), vocab_size=tiny_data.vocab_size)
    (step_a, a), (step_b, b) = (_final_state(d / "stages" / "1", model_cfg) for d in (killed, ref_dir))
    assert step_a == step_b == 12
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("stages, message", [
    ("[{seq_len: 512, steps: 2}, {seq_len: 256, steps: 2}]", "is below stages[0].seq_len"),
    ("[{seq_len: 256, steps: 2, length_mix: {full: 0.5, short: 0.6}}]", "must sum to 1"),
    ("[{seq_len: 256, steps: 2, rope_theat: 1.0e5}]", "did you mean 'rope_theta'?"),
    ("[{seq_len: 256, steps: 2, length_mix: {ful: 1.0}}]", "did you mean 'full'?"),
    ("[{seq_len: 256}]", "give one of steps and tokens"),
    ("[{seq_len: 2048, steps: 2}]", "stages[0]: train.seq_len (2048) exceeds model.max_position_embeddings"),
])
def test_bad_stages_are_one_line(run_cli, tmp_path, stages, message):
    config = tmp_path / "bad.yaml"
    config.write_text(f"base: {TINY}\nstages: {stages}\n")
    status, _, err = run_cli("train", config, f"run_dir={tmp_path / 'run'}")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run").exists()


def test_short_rows_never_attend_past_short_len():
    rng = np.random.default_rng(0)
    windows = rng.integers(1, 50, size=(10, 65))
    windows[3, 40] = 0  # an eos: a document boundary in a short row still splits it
    batch = pack_windows(windows, eos_id=0)
    rows = short_rows(step=7, global_batch_size=10, short_share=0.6, seed=0)
    assert rows.sum() == 6 and np.array_equal(rows, short_rows(7, 10, 0.6, 0))  # exact share, deterministic
    out = cut_documents(batch, rows, short_len=16)
    for r in range(10):
        seg, pos = out["segment_ids"][r], out["positions"][r]
        lengths = np.bincount(seg)[1:]
        if rows[r]:
            assert lengths.max() <= 16 and pos.max() < 16
        else:
            np.testing.assert_array_equal(seg, batch["segment_ids"][r])
            np.testing.assert_array_equal(pos, batch["positions"][r])
        np.testing.assert_array_equal(pos[1:][seg[1:] == seg[:-1]], pos[:-1][seg[1:] == seg[:-1]] + 1)
    np.testing.assert_array_equal(out["loss_mask"], batch["loss_mask"])


def test_presets_load():
    long = load_config(CONFIGS / "qwen2.5-long.yaml")
    assert [(s.seq_len, s.rope_theta) for s in long.stages] == [(4096, 1e4), (32768, 1e6)]
    turbo = load_config(CONFIGS / "qwen2.5-turbo-long.yaml")
    assert [s.seq_len for s in turbo.stages] == [32768, 65536, 131072, 262144]
    assert all(s.length_mix == {"full": 0.4, "short": 0.6, "short_len": None} for s in turbo.stages)
    assert json.loads(json.dumps(len(load_config(CONFIGS / "turbo-long-tiny.yaml").stages))) == 4
