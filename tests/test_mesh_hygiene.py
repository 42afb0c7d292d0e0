"""Mesh hygiene: training on data x fsdp x tensor meshes makes XLA's SPMD partitioner neither replicate a
tensor to reshard it ("involuntary full rematerialization") nor change the math.

The activation pins (`qwenjax.model.constrain`, mapped by `train/sharding.py`'s one rules table) are what keep
the partitioner on efficient reshardings; this test trains a few steps of configs/tiny.yaml on 8 simulated CPU
devices, reads XLA's log on stderr and compares the losses with a single-device run.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import TINY, run_python, tiny_overrides

from qwenjax.run_config import load_config
from qwenjax.train import train
from qwenjax.train.metrics import read_metrics

STEPS = ("train.steps=3", "train.log_every=1", "eval.batches=1", "checkpoint.enabled=false")
# The mesh that warned before the activation pins (1x2x4, 4x1x2, 1x8x1 and 1x1x8 did not; each mesh costs
# a compile, ~25 s on two cores, so one is checked here; tests/test_sharding.py covers the others' losses).
MESHES = {"d2f2t2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")}
WARNING = "Involuntary full rematerialization"

SCRIPT = f"""
import json, sys
from qwenjax.train.metrics import read_metrics
from qwenjax.run_config import load_config
from qwenjax.train import train
cache, root, meshes, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
out = {{}}
for name, mesh in meshes.items():
    run_dir = f"{{root}}/{{name}}"
    train(load_config({str(TINY)!r}, [f"data.cache_dir={{cache}}", f"run_dir={{run_dir}}", *mesh, *steps]))
    print(f"=== trained {{name}}", file=sys.stderr, flush=True)
    out[name] = [r["loss"] for r in read_metrics(run_dir + "/metrics.jsonl")]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def single_device_losses(tiny_config, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    train(load_config(TINY, tiny_overrides(tiny_config.data.cache_dir, run_dir, *STEPS)))
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def test_no_involuntary_rematerialization_and_same_losses(single_device_losses, tiny_config, tmp_path):
    result = run_python(SCRIPT, str(tiny_config.data.cache_dir), str(tmp_path), json.dumps(MESHES), *STEPS,
                        devices=8, timeout=300, TF_CPP_MIN_LOG_LEVEL="0")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line[:300] for line in result.stderr.splitlines() if WARNING in line]
    assert not warnings, "XLA resharded by full replication:\n" + "\n".join(warnings)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in MESHES:
        assert len(out[name]) == len(single_device_losses) == 3, name
        for a, b in zip(out[name], single_device_losses, strict=True):
            assert math.isclose(a, b, rel_tol=1e-5), f"{name}: {out[name]} vs {single_device_losses}"


def test_plan_of_7b_on_a_data_fsdp_tensor_mesh_has_no_involuntary_rematerialization():
    """The issue's second case: the 7B train step as `qwenjax plan` compiles it for 32 devices (2 x 4 x 4)."""
    import subprocess
    import sys

    from conftest import CONFIGS, subprocess_env

    argv = [sys.executable, "-m", "qwenjax.cli", "plan", str(CONFIGS / "qwen2.5-7b.yaml"), "train.seq_len=4096",
            "train.batch_size=8", "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=4", "--devices", "32",
            "--max-compiles", "1"]
    r = subprocess.run(argv, env=subprocess_env(1, TF_CPP_MIN_LOG_LEVEL="0"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["mesh"] == {"data": 2, "fsdp": 4, "tensor": 4}
    warnings = [line[:300] for line in r.stderr.splitlines() if WARNING in line]
    assert not warnings, "XLA resharded by full replication:\n" + "\n".join(warnings)
