"""Sharding: the logical-axis rules, mesh resolution, and equal losses on any mesh and across processes.

The multi-device runs happen in subprocesses with 8 host CPU devices (or 2 processes x 4 devices on a
loopback coordinator with gloo collectives); the reference is a single-device run in this process.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import TINY, TRAIN_SCRIPT, free_port, run_python, subprocess_env, tiny_overrides
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from qwenjax.errors import UserError
from qwenjax.run_config import load_config, model_config
from qwenjax.train import abstract_state, sharding, train
from qwenjax.train.metrics import read_metrics

STEPS = ("train.steps=5", "train.log_every=1", "eval.batches=1", "checkpoint.enabled=false")
MESHES = {
    "data8": ("mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"),
    "fsdp8": ("mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"),
    "d2f2t2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
}


def _mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


def test_logical_axis_rules(tiny_config):
    mc = model_config(tiny_config, vocab_size=1024)  # 4 heads, 2 kv heads, hidden 128, mlp 384
    specs = sharding.param_specs(abstract_state(mc)["params"], _mesh(2, 2, 2), mc)
    attn, mlp = specs["layers"][0]["self_attn"], specs["layers"][0]["mlp"]
    assert specs["embed_tokens"] == P("tensor", "fsdp")  # (vocab, embed)
    assert attn["q_proj"]["kernel"] == P("fsdp", "tensor") and attn["q_proj"]["bias"] == P("tensor")
    assert attn["k_proj"]["kernel"] == P("fsdp", "tensor")
    assert attn["o_proj"]["kernel"] == P("tensor", "fsdp")
    assert mlp["gate_proj"]["kernel"] == P("fsdp", "tensor")
    assert mlp["down_proj"]["kernel"] == P("tensor", "fsdp")
    assert specs["norm"]["weight"] == P(None)
    # heads are split whole: 2 kv heads on tensor=4 fall back to replication, 4 query heads do not
    specs4 = sharding.param_specs(abstract_state(mc)["params"], _mesh(1, 2, 4), mc)
    attn4 = specs4["layers"][0]["self_attn"]
    assert attn4["q_proj"]["kernel"] == P("fsdp", "tensor") and attn4["k_proj"]["kernel"] == P("fsdp", None)
    # size-1 axes are dropped; indivisible dims replicated
    assert sharding.logical_to_spec(("embed", "mlp"), (128, 384), _mesh(8, 1, 1)) == P(None, None)
    assert sharding.logical_to_spec(("embed", "mlp"), (100, 384), _mesh(1, 8, 1)) == P(None, None)
    batch_spec = sharding.logical_to_spec(("batch", "length"), (16, 64), _mesh(2, 4, 1))
    assert batch_spec == P(("data", "fsdp"), None)
    # optimizer moments get the parameter's sharding, counters are replicated
    shardings = sharding.state_shardings(abstract_state(mc), _mesh(1, 2, 2), mc)
    mu = shardings["opt_state"].mu
    assert mu["layers"][1]["mlp"]["up_proj"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["opt_state"].count.spec == P() and shardings["step"].spec == P()


def test_mesh_shape_and_distributed_env(monkeypatch):
    assert sharding.mesh_shape(1, -1, 1, 8) == (1, 8, 1)
    assert sharding.mesh_shape(2, -1, 2, 8) == (2, 2, 2)
    with pytest.raises(UserError, match="= 6, but there are 8 devices"):
        sharding.mesh_shape(3, 2, 1, 8)
    with pytest.raises(UserError, match="cannot be split"):
        sharding.mesh_shape(3, -1, 1, 8)
    for key in ("QWENJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "QWENJAX_NUM_PROCESSES", "QWENJAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    assert sharding.distributed_env() is None
    monkeypatch.setenv("QWENJAX_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("QWENJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("QWENJAX_PROCESS_ID", "1")
    assert sharding.distributed_env() == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                                          "process_id": 1}
    monkeypatch.setenv("QWENJAX_DISTRIBUTED", "0")
    assert sharding.distributed_env() is None


@pytest.fixture(scope="module")
def single_device_losses(tiny_config, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    train(load_config(TINY, tiny_overrides(tiny_config.data.cache_dir, run_dir, *STEPS)))
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


MESH_SCRIPT = f"""
import json, sys
from qwenjax.train.metrics import read_metrics
from qwenjax.run_config import load_config
from qwenjax.train import train
cache, root, meshes, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
out = {{}}
for name, mesh in meshes.items():
    run_dir = f"{{root}}/{{name}}"
    overrides = [f"data.cache_dir={{cache}}", f"run_dir={{run_dir}}", *mesh, *steps]
    s = train(load_config({str(TINY)!r}, overrides))
    out[name] = {{"losses": [r["loss"] for r in read_metrics(run_dir + "/metrics.jsonl")], "mesh": s["mesh"]}}
print(json.dumps(out))
"""


def _assert_close(losses, reference, what):
    assert len(losses) == len(reference) == 5, what
    for a, b in zip(losses, reference, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5), f"{what}: {losses} vs {reference}"


@pytest.mark.slow
def test_losses_agree_across_meshes(single_device_losses, tiny_config, tmp_path):
    """5 steps of configs/tiny.yaml: one device = data 8 = fsdp 8 = data 2 x fsdp 2 x tensor 2 (rel 1e-5)."""
    result = run_python(MESH_SCRIPT, str(tiny_config.data.cache_dir), str(tmp_path), json.dumps(MESHES),
                        *STEPS, devices=8, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["d2f2t2"]["mesh"] == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    for name in MESHES:
        _assert_close(out[name]["losses"], single_device_losses, name)


@pytest.mark.slow
def test_two_processes_agree(single_device_losses, tiny_config, tmp_path):
    """Two local processes x 4 CPU devices (loopback coordinator, gloo): same losses as one device."""
    import subprocess
    import sys

    port = free_port()
    run_dir = tmp_path / "mp"
    args = [sys.executable, "-c", TRAIN_SCRIPT, str(TINY),
            *tiny_overrides(tiny_config.data.cache_dir, run_dir, *STEPS, *MESHES["d2f2t2"],
                            "checkpoint.enabled=true", "checkpoint.every_steps=0")]  # Orbax across processes
    procs = [subprocess.Popen(args, env=subprocess_env(4, QWENJAX_COORDINATOR=f"127.0.0.1:{port}",
                                                       QWENJAX_NUM_PROCESSES="2", QWENJAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=420))
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(s["processes"] == 2 and s["devices"] == 8 for s in summaries)
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]
    assert (run_dir / "ckpt" / "5").is_dir()
    _assert_close([r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")], single_device_losses, "2 x 4")
