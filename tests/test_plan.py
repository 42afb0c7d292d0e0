"""`qwenjax plan`: the real train step compiled for N simulated devices; bytes per device against the analytic
count, and one line + exit 2 on bad input (checked before JAX compiles anything)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CONFIGS, TINY, subprocess_env

from qwenjax.config import PRESETS, flops_per_token, param_counts
from qwenjax.train.hlo import collective_bytes


def test_plan_0_5b_on_8_devices_matches_the_analytic_parameter_bytes():
    # the subprocess starts with one CPU device (XLA_FLAGS): plan itself must arrange the 8
    B, T = 8, 64
    r = subprocess.run([sys.executable, "-m", "qwenjax.cli", "plan", str(CONFIGS / "qwen2.5-0.5b.yaml"),
                        f"train.seq_len={T}", f"train.batch_size={B}", "--devices", "8", "--hbm", "95GiB"],
                       env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    n, _ = param_counts(PRESETS["qwen2.5-0.5b"])
    fsdp_only = n * 4 / 8  # float32, every matrix split 8 ways along its embed axis
    mem = out["memory_per_device"]
    # biases and norms (about 72k parameters) are replicated: a little above n * 4 / 8
    assert fsdp_only <= mem["parameters"] <= fsdp_only * 1.002
    assert mem["optimizer_state"] == pytest.approx(2 * mem["parameters"], rel=1e-3)
    assert mem["xla"]["alias"] > 0.99 * (mem["parameters"] + mem["optimizer_state"])  # the state is donated
    assert mem["peak"] == mem["xla"]["argument"] + mem["xla"]["output"] - mem["xla"]["alias"] + mem["xla"]["temp"]
    assert out["fits"] is True and out["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert out["batch"]["tokens_per_device"] == B * T / 8
    assert out["flops"]["model_per_step"] == flops_per_token(PRESETS["qwen2.5-0.5b"], T) * B * T
    assert out["flops"]["xla_per_device"] > 0
    assert out["collectives_per_step"]["total"] > 0
    assert out["attention"] == {**out["attention"], "requested": "auto", "lowered": "flash"}


@pytest.mark.parametrize("argv, message", [
    (["mesh.tensor=3", "--devices", "8"], "8 devices cannot be split"),
    (["--topology", "v9-8"], "unknown topology 'v9-8'"),
    (["--devices", "8", "--hbm", "lots"], "--hbm: cannot read 'lots'"),
    (["--devices", "6"], "divisible by the data-parallel size"),
    (["--topology", "v5p-7"], "must be even"),
])
def test_bad_input_is_one_line_and_exit_2(run_cli, argv, message):
    status, out, err = run_cli("plan", CONFIGS / "qwen2.5-0.5b.yaml", *argv)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_topology_sets_devices_and_hbm():
    from qwenjax.train.plan import parse_bytes, topology

    assert topology("v5p-256")["chips"] == 128 and topology("v5e-16")["chips"] == 16
    assert topology("h100-8")["hbm_bytes"] == 80 * 10**9
    assert parse_bytes("95GiB") == 95 * 2**30 and parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("80e9") == 80 * 10**9


def test_plan_reruns_itself_when_jax_started_with_fewer_devices(run_cli, qwenjax_cache):
    import jax

    assert len(jax.devices("cpu")) < 2  # this pytest process: one CPU device, so plan runs a subprocess
    status, out, err = run_cli("plan", TINY, f"data.cache_dir={qwenjax_cache}", "train.batch_size=4",
                               "model.num_hidden_layers=1", "--devices", "2", "--hbm", "1GiB")
    assert status == 0, err
    plan = json.loads(out)
    assert plan["devices"] == 2 and plan["fits"] is True and plan["config"]["scan_layers"] is False


HLO = """\
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
}

ENTRY %main (a: f32[4,2]) -> f32[8,2] {
  %ag = f32[8,2]{1,0} all-gather(f32[4,2]{1,0} %a), channel_id=2, dimensions={0}
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"24"}}
}
"""


def test_collective_bytes_multiplies_while_bodies_by_their_trip_count():
    got = collective_bytes(HLO)
    assert got["all-gather"] == 64 and got["all-reduce"] == 24 * 32 and got["total"] == 64 + 24 * 32


def test_search_when_it_does_not_fit(run_cli, qwenjax_cache):
    # one device: runs in this process; 1 MiB holds nothing, so full remat fails and grad_accum doubles
    status, out, err = run_cli("plan", TINY, f"data.cache_dir={qwenjax_cache}", "train.batch_size=4",
                               "model.num_hidden_layers=1", "--devices", "1", "--hbm", "1MiB", "--max-compiles", "2")
    assert status == 0, err
    search = json.loads(out)["search"]
    assert [(t["remat"], t["grad_accum"]) for t in search["tried"]] == [("full", 1), ("full", 2)]
    assert search["fits_with"] is None and not any(t["fits"] for t in search["tried"])
