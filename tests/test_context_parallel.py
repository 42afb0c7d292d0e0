"""Context parallelism: a sequence split over the `context` mesh axis computes what one device computes.

One subprocess with 8 simulated CPU devices checks both kernels (`allgather`, `ring`) against
`qwenjax.attention.reference` (forward and gradients, packed segments, with and without a window) and
trains configs/tiny.yaml on mesh.context=8 and on mesh.context=4 x mesh.fsdp=2, with short documents packed
in every row (segment ids and positions restart inside each slice of 8 or 16 tokens); the losses must equal
the single-device run's at relative 1e-5.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import TINY, run_python, tiny_overrides

from qwenjax.errors import UserError
from qwenjax.run_config import load_config
from qwenjax.train import sharding, train
from qwenjax.train.metrics import read_metrics

# short_len 12: every 64-token row holds 5+ documents, most of them straddling a slice boundary
STEPS = ("train.steps=3", "train.log_every=1", "eval.batches=1", "checkpoint.enabled=false",
         "data.length_mix={full: 0.0, short: 1.0, short_len: 12}")
MESHES = {"context8": ("mesh.fsdp=1", "mesh.context=8"), "context4_fsdp2": ("mesh.fsdp=2", "mesh.context=4")}

SCRIPT = f"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from qwenjax import attention, context_parallel as cp
from qwenjax.run_config import load_config
from qwenjax.train import sharding, train
from qwenjax.train.metrics import read_metrics
jax.config.update("jax_default_matmul_precision", "highest")
cache, root, meshes, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
out = {{"kernel": {{}}, "loss": {{}}}}

B, T, N, K, H = 2, 64, 4, 2, 16
r = np.random.default_rng(0)
q, k, v = (jnp.asarray(r.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
seg = jnp.asarray(np.cumsum(r.random((B, T)) < 0.1, axis=1) + 1, jnp.int32)
mesh = sharding.make_mesh(1, 2, 1, context=4)
spec = lambda axes, shape: sharding.logical_to_spec(axes, shape, mesh)
for strategy in cp.STRATEGIES:
    for window in (None, 20):
        def loss(f, q, k, v):
            o = f(q, k, v, segment_ids_BT=seg, window=window)
            return jnp.sum(o * jnp.sin(o)), o
        grad = lambda f: jax.value_and_grad(lambda *a: loss(f, *a), argnums=(0, 1, 2), has_aux=True)
        want = grad(attention.reference)(q, k, v)
        def split(q, k, v):
            with cp.context_mesh(mesh, spec, strategy):
                return grad(cp.attend)(q, k, v)
        got = jax.jit(split)(q, k, v)
        rel = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
        out["kernel"][f"{{strategy}} window={{window}}"] = rel

for name, mesh_args in meshes.items():
    run_dir = f"{{root}}/{{name}}"
    train(load_config({str(TINY)!r}, [f"data.cache_dir={{cache}}", f"run_dir={{run_dir}}", *mesh_args, *steps]))
    out["loss"][name] = [r["loss"] for r in read_metrics(run_dir + "/metrics.jsonl")]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def split_runs(tiny_config, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    result = run_python(SCRIPT, str(tiny_config.data.cache_dir), str(root), json.dumps(MESHES), *STEPS,
                        devices=8, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_kernels_equal_reference(split_runs):
    assert set(split_runs["kernel"]) == {f"{s} window={w}" for s in ("allgather", "ring") for w in (None, 20)}
    for name, rel in split_runs["kernel"].items():
        assert len(rel) == 5 and max(rel) < 1e-5, f"{name}: (loss, out, dq, dk, dv) relative errors {rel}"


def test_training_losses_equal_single_device(split_runs, tiny_config, tmp_path):
    run_dir = tmp_path / "single"
    train(load_config(TINY, tiny_overrides(tiny_config.data.cache_dir, run_dir, *STEPS)))
    single = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert len(single) == 3
    for name, losses in split_runs["loss"].items():
        assert len(losses) == 3, name
        for a, b in zip(losses, single, strict=True):
            assert math.isclose(a, b, rel_tol=1e-5), f"{name}: {losses} vs one device {single}"


def test_bad_context_is_one_line(tiny_config):
    with pytest.raises(UserError, match=r"train.seq_len \(64\) is not divisible by mesh.context \(3\)"):
        load_config(TINY, [f"data.cache_dir={tiny_config.data.cache_dir}", "mesh.context=3"])
    with pytest.raises(UserError, match="mesh.context must be a positive integer"):
        load_config(TINY, ["mesh.context=-1"])
    with pytest.raises(UserError, match=r"mesh.data x mesh.fsdp x mesh.tensor x mesh.context = 1 x 2 x 1 x 4 = 8, "
                                        r"but there are 4 devices"):
        sharding.mesh_shape(1, 2, 1, 4, context=4)
    assert sharding.mesh_shape(1, -1, 1, 8, context=4) == (1, 2, 1)
    with pytest.raises(UserError, match="8 devices cannot be split with mesh.data=1, mesh.tensor=1, mesh.context=3"):
        sharding.mesh_shape(1, -1, 1, 8, context=3)
