"""Runs chain: stage 2 starts from stage 1's run directory (new rope_theta and seq_len), with or without
its optimizer state; a run's model directory (`RUN_DIR/model`, `qwenjax export`) feeds init_from and
convert --to-hf; bad init_from input is one error line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import TINY, tiny_overrides

from qwenjax import cli, model_io
from qwenjax.run_config import load_config, model_config
from qwenjax.train import abstract_state, sharding, train
from qwenjax.train.metrics import read_metrics
from qwenjax.train.run_dir import restore_run_state
from qwenjax.train.start import initial_state

STAGE1 = ("train.steps=40", "train.log_every=1", "eval.batches=1", "checkpoint.every_steps=40",
          "optim.warmup_steps=5")
STAGE2 = ("train.steps=2", "train.log_every=1", "eval.batches=1", "checkpoint.enabled=false",
          "model.rope_theta=20000.0", "train.seq_len=128", "train.batch_size=16", "optim.warmup_steps=0")


@pytest.fixture(scope="module")
def stage1(tiny_config, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("chain") / "stage1"
    summary = train(load_config(TINY, tiny_overrides(tiny_config.data.cache_dir, run_dir, *STAGE1)))
    return run_dir, summary


def _stage2(tiny_config, run_dir, *extra):
    return load_config(TINY, tiny_overrides(tiny_config.data.cache_dir, run_dir, *STAGE2, *extra))


def test_stage2_starts_from_stage1(tiny_config, stage1, tmp_path):
    run1, summary1 = stage1
    final1 = read_metrics(run1 / "metrics.jsonl")[-1]["loss"]
    assert final1 < summary1["initial_loss"] - 1.0  # stage 1 learned something
    s2 = train(_stage2(tiny_config, tmp_path / "stage2", f"model.init_from={run1}"))
    fresh = train(_stage2(tiny_config, tmp_path / "fresh"))
    first2 = read_metrics(tmp_path / "stage2" / "metrics.jsonl")[0]["loss"]
    print(f"stage 1: initial {summary1['initial_loss']:.3f} final {final1:.3f}; stage 2 first {first2:.3f}; "
          f"fresh first {fresh['initial_loss']:.3f}")
    assert abs(first2 - final1) < 0.5
    assert first2 < fresh["initial_loss"] - 1.0
    assert s2["init_from"] == str(run1.resolve())
    # the summary records the chain; a finished stage 2 is a no-op rerun
    assert train(_stage2(tiny_config, tmp_path / "stage2", f"model.init_from={run1}")) == s2


@pytest.mark.parametrize("resume", [False, True])
def test_resume_optimizer_keeps_adam_moments_and_restarts_the_schedule(tiny_config, tiny_data, stage1, tmp_path,
                                                                      resume):
    """true: stage 2 starts with stage 1's Adam moments and bias-correction count; false: fresh moments.
    Either way the step counter (the lr schedule) restarts at 0."""
    run1, _ = stage1
    cfg = _stage2(tiny_config, tmp_path / "s2", f"model.init_from={run1}", f"train.resume_optimizer={resume}")
    model_cfg = model_config(cfg, vocab_size=tiny_data.vocab_size)
    mesh = sharding.mesh_from_config(cfg.mesh)
    state_sh = sharding.state_shardings(abstract_state(model_cfg), mesh, model_cfg)
    state = initial_state(cfg, model_cfg, jax.random.key(0), mesh, state_sh)
    _, saved, step1 = restore_run_state(run1)
    assert step1 == 40 and int(saved["step"]) == 40 and int(state["step"]) == 0
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(saved["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    got, prev = jax.tree.leaves(state["opt_state"]), jax.tree.leaves(saved["opt_state"])
    if resume:
        for a, b in zip(got, prev, strict=True):
            np.testing.assert_array_equal(a, b)
    else:
        assert all(not np.any(np.asarray(a)) for a in got)  # zero moments, count 0


def test_model_dir_export_and_convert(tiny_config, stage1, tmp_path, capsys):
    run1, _ = stage1
    assert model_io.is_model_dir(run1 / "model")
    assert any((run1 / "model").glob("*.model"))  # the tokenizer travels with the weights
    assert cli.main(["export", str(run1), "--to", str(tmp_path / "exported")]) == 0
    cfg_a, params_a = model_io.load_model(run1 / "model")
    cfg_b, params_b = model_io.load_model(tmp_path / "exported")
    assert cfg_a == cfg_b and cfg_a.rope_theta == 10000.0
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)
    pytest.importorskip("safetensors")
    assert cli.main(["convert", "--from", str(tmp_path / "exported"), "--to-hf", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == cfg_a.hidden_size


def test_bad_init_from_is_one_line(tiny_config, tiny_data, stage1, tmp_path, capsys):
    run1, _ = stage1
    empty_run = tmp_path / "not-trained"
    empty_run.mkdir()
    (empty_run / "config.yaml").write_text((run1 / "config.yaml").read_text())
    cases = [
        (f"model.init_from={tmp_path / 'nothing'}", "neither a model directory"),
        (f"model.init_from={empty_run}", "holds no checkpoint"),
        (f"model.init_from={run1 / 'model'}", "train.resume_optimizer: true needs"),
    ]
    for i, (init_from, message) in enumerate(cases):
        extra = ("train.resume_optimizer=true",) if i == 2 else ()
        status = cli.main(["train", str(TINY), *tiny_overrides(tiny_config.data.cache_dir, tmp_path / f"r{i}",
                                                               *STAGE2, init_from, *extra)])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and message in err[0], err
