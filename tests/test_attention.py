"""Attention kernels: every kernel that can run on CPU equals the reference (GQA, packed segments, sliding
windows); the hardware kernels' own wiring is checked on CPU through XLA (cudnn's call) and the Pallas
interpreter (splash); asked for on the wrong hardware they, and bad names, give one UserError line."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, tiny_overrides

from qwenjax import attention, cli
from qwenjax.errors import UserError
from qwenjax.model import init_params, logits
from qwenjax.run_config import load_config, model_config
from qwenjax.run_sections import ATTENTION_IMPLS

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

B, T, N, K, H = 2, 256, 4, 2, 16  # T=256: 4 blockwise blocks, 2 splash blocks; GQA R=2
TOL = dict(rtol=1e-5, atol=1e-5)
on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU behaviour")


def _qkv(seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = ((B, T, N, H), (B, T, K, H), (B, T, K, H))
    return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


def _packed_segment_ids():
    """Row 0: documents of 100, 37 and 119 tokens (boundaries inside blocks); row 1: one document."""
    row0 = np.repeat([1, 2, 3], [100, 37, 119])
    return jnp.asarray(np.stack([row0, np.ones(T, int)]), jnp.int32)


CASES = {"causal": dict(), "packed": dict(segment_ids_BT=_packed_segment_ids()), "window": dict(window=100),
         "packed+window": dict(segment_ids_BT=_packed_segment_ids(), window=70)}
CPU_KERNELS = {
    "blockwise": attention.blockwise,
    "cudnn-call-via-xla": functools.partial(attention.cudnn, implementation="xla"),
    "splash-interpreted": functools.partial(attention.splash, interpret=True),
}


def _run(kernel, q, k, v, case):
    kw = CASES[case]
    return jax.jit(lambda q, k, v, seg: kernel(q, k, v, segment_ids_BT=seg, window=kw.get("window")))(
        q, k, v, kw.get("segment_ids_BT"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", CPU_KERNELS)
def test_kernel_equals_reference(name, case):
    q, k, v = _qkv()
    want = _run(attention.reference, q, k, v, case)
    np.testing.assert_allclose(_run(CPU_KERNELS[name], q, k, v, case), want, **TOL)


def test_reference_masks_what_it_should():
    """Changing a key the query may not see (other document, outside the window, future) changes nothing."""
    q, k, v = _qkv()
    seg = _packed_segment_ids()
    out = attention.reference(q, k, v, segment_ids_BT=seg, window=20)
    t = 110  # row 0, document 2 (slots 100..136): sees slots 100..110 only
    for s in (99, 111, 200):
        out2 = attention.reference(q, k.at[0, s].add(1.0), v.at[0, s].add(1.0), segment_ids_BT=seg, window=20)
        np.testing.assert_array_equal(out2[0, t], out[0, t])
    out3 = attention.reference(q, k.at[0, 100].add(1.0), v, segment_ids_BT=seg, window=20)
    assert not np.allclose(out3[0, t], out[0, t])


@pytest.mark.parametrize("case", ["packed", "packed+window"])
def test_blockwise_gradients_equal_reference(case):
    q, k, v = _qkv(1)
    kw = CASES[case]

    def loss(kernel, q, k, v):
        return jnp.sum(kernel(q, k, v, **kw) * v.mean(axis=2, keepdims=True))

    def grads(kernel):
        return jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)

    for want, got in zip(grads(attention.reference), grads(attention.blockwise), strict=True):
        np.testing.assert_allclose(got, want, **TOL)


@on_cpu
@pytest.mark.parametrize("impl, hardware", [("cudnn", "an NVIDIA GPU"), ("splash", "a TPU")])
def test_hardware_kernels_on_cpu_raise_one_clear_line(impl, hardware):
    q, k, v = _qkv()
    with pytest.raises(UserError, match=f"attention.impl={impl} needs {hardware}, but JAX runs on cpu") as e:
        attention.attend(q, k, v, impl=impl)
    assert "\n" not in str(e.value)


@on_cpu
def test_auto_is_blockwise_on_cpu():
    q, k, _ = _qkv()
    assert attention.resolve("auto", q, k) == "blockwise"


@pytest.mark.parametrize("backend, dtype, seq, want", [
    ("gpu", jnp.bfloat16, 64, "cudnn"), ("gpu", jnp.float32, 64, "blockwise"),
    ("tpu", jnp.float32, 256, "splash"), ("tpu", jnp.float32, 64, "blockwise")])
def test_auto_picks_the_hardware_kernel_when_it_fits(monkeypatch, backend, dtype, seq, want):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    q, k = jnp.zeros((1, seq, N, 32), dtype), jnp.zeros((1, seq, K, 32), dtype)
    assert attention.resolve("auto", q, k) == want
    assert attention.resolve("auto", q, k, cached=True) == "blockwise"  # decoding over a KV cache
    if want == "blockwise":  # asked for explicitly, the misfit is named
        with pytest.raises(UserError, match="needs (bfloat16|sequence lengths that are multiples of 128)"):
            attention.resolve("cudnn" if backend == "gpu" else "splash", q, k)


def test_unknown_impl_and_config_value_are_one_line():
    q, k, v = _qkv()
    with pytest.raises(UserError, match=r"got 'refrence' \(did you mean 'reference'\?\)"):
        attention.attend(q, k, v, impl="refrence")
    assert load_config(None).attention.impl == "auto"
    assert load_config(None, ["attention.impl=blockwise"]).attention.impl == "blockwise"
    with pytest.raises(UserError, match=r"attention.impl must be one of .*got 'blokwise' \(did you mean "
                                        r"'blockwise'\?\)") as e:
        load_config(None, ["attention.impl=blokwise"])
    assert "\n" not in str(e.value)


def test_run_config_names_every_kernel():
    assert set(ATTENTION_IMPLS) == {attention.AUTO, *attention.KERNELS}


@pytest.mark.parametrize("sliding", [False, True], ids=["full", "sliding-window"])
def test_tiny_model_reference_equals_blockwise(sliding):
    config = model_config(load_config(TINY), vocab_size=1024)
    if sliding:  # layers 2 and 3 use a window that ends inside a block
        config = config.replace(use_sliding_window=True, sliding_window=50, max_window_layers=2)
    params = init_params(config, 0)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 160)), jnp.int32)
    segment_ids = jnp.asarray(np.stack([np.repeat([1, 2], [90, 70]), np.ones(160, int)]), jnp.int32)
    forward = jax.jit(logits, static_argnums=0, static_argnames="attention_impl")
    want = forward(config, params, tokens, segment_ids=segment_ids, attention_impl="reference")
    got = forward(config, params, tokens, segment_ids=segment_ids, attention_impl="blockwise")
    np.testing.assert_allclose(got, want, **TOL)


def test_train_reference_equals_blockwise(tmp_path, tiny_config):
    """`qwenjax train` with attention.impl=reference and =blockwise: the same losses, step by step (T = 256:
    four key blocks, packed documents, so blockwise really runs blocks and skips them)."""
    losses = {}
    for impl in ("reference", "blockwise"):
        run_dir = tmp_path / impl
        assert cli.main(["train", str(TINY), *tiny_overrides(
            tiny_config.data.cache_dir, run_dir, f"attention.impl={impl}", "train.steps=3", "train.seq_len=256",
            "train.batch_size=4", "train.log_every=1", "eval.batches=1", "checkpoint.every_steps=0")]) == 0
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[impl] = [r["loss"] for r in lines if "loss" in r] + [json.loads(
            (run_dir / "summary.json").read_text())["eval_loss"]]
    assert len(losses["reference"]) == 4
    np.testing.assert_allclose(losses["blockwise"], losses["reference"], rtol=2e-5)
