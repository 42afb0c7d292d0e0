"""Resume: a run killed with SIGKILL after a checkpoint and rerun with the same command ends bitwise
identical to an uninterrupted run; an unrestorable checkpoint is reported and the previous one used."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import TINY, TRAIN_SCRIPT, run_python, subprocess_env, tiny_overrides

from qwenjax.run_config import load_config, model_config
from qwenjax.train import abstract_state, train
from qwenjax.train.checkpoint import Checkpointer, abstract_with_shardings
from qwenjax.train.metrics import read_metrics

COMMON = ("train.steps=20", "checkpoint.every_steps=5", "train.log_every=5", "eval.batches=1")


def _final_state(run_dir, model_cfg):
    abstract = abstract_state(model_cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"train": abstract_with_shardings(abstract, jax.tree.map(lambda _: device, abstract)),
              "rng": jax.ShapeDtypeStruct((2,), np.uint32, sharding=device)}
    ckpt = Checkpointer(run_dir / "ckpt", keep=2)
    try:
        step, state, meta = ckpt.restore(target)
    finally:
        ckpt.close()
    return step, state


@pytest.mark.slow
def test_kill_9_then_rerun_is_bitwise_identical(tiny_config, tiny_data, tmp_path, caplog):
    cache = tiny_config.data.cache_dir
    killed = tmp_path / "killed"
    args = [sys.executable, "-c", TRAIN_SCRIPT, str(TINY), *tiny_overrides(cache, killed, *COMMON)]
    proc = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 240
        while not (killed / "ckpt" / "5").is_dir():  # Orbax renames the folder into place when complete
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"

    rerun = run_python(TRAIN_SCRIPT, str(TINY), *tiny_overrides(cache, killed, *COMMON))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert re.search(r"resuming .* from step (5|10|15)\b", rerun.stderr), rerun.stderr[-2000:]
    assert "taking over the stale lock of pid" in rerun.stderr  # the killed run's .lock, its holder dead
    assert not (killed / ".lock").exists()

    reference = train(load_config(TINY, tiny_overrides(cache, tmp_path / "reference", *COMMON)))
    losses = {r["step"]: r["loss"] for r in read_metrics(killed / "metrics.jsonl")}
    ref_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")}
    assert losses == ref_losses  # every logged step, bitwise (JSON keeps all float32 digits)
    assert sorted(losses) == [1, 5, 10, 15, 20]
    for key in ("final_loss", "eval_loss", "steps_completed", "tokens"):
        assert resumed[key] == reference[key], key

    model_cfg = model_config(tiny_config, vocab_size=tiny_data.vocab_size)
    step_a, a = _final_state(killed, model_cfg)
    step_b, b = _final_state(tmp_path / "reference", model_cfg)
    assert step_a == step_b == 20
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # An unrestorable newest checkpoint: reported, set aside, the previous one used.
    state_dir = killed / "ckpt" / "20" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="qwenjax"):
        summary = train(load_config(TINY, tiny_overrides(cache, killed, *COMMON, "train.steps=25")))
    assert "could not be restored" in caplog.text
    assert (killed / "ckpt" / "corrupt-20").is_dir()
    assert summary["steps_completed"] == 25
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-3:] == [15, 20, 25]  # resumed at 15: no duplicates

    # No checkpoint restores: one line that names the folder and each step's reason (no object reprs).
    for step_dir in (killed / "ckpt").iterdir():
        if step_dir.name.isdigit():
            for f in (step_dir / "state").rglob("*"):
                if f.is_file():
                    f.write_bytes(b"garbage")
    from qwenjax.errors import UserError

    with pytest.raises(UserError) as err:
        train(load_config(TINY, tiny_overrides(cache, killed, *COMMON, "train.steps=30")))
    message = str(err.value)
    assert "\n" not in message and f"move {killed / 'ckpt'} away" in message
    assert "no checkpoint in" in message and "step 25:" in message
    assert "bound method" not in message and "object at 0x" not in message
