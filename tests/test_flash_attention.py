"""The flash kernel (qwenjax.attention_flash) equals the reference, forward and gradient, with packed segments,
sliding windows, GQA and MQA, and T that is not a multiple of the block; its backward memory grows as T, not
T^2 (XLA's compiled memory analysis, no run)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from qwenjax import attention
from qwenjax.attention_flash import flash
from qwenjax.model import init_params, logits
from qwenjax.run_config import load_config, model_config

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

B, N, H, BLOCK = 2, 4, 16, 64
TOL = dict(rtol=1e-5, atol=2e-5)


def _inputs(T: int, K: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    # Row 0: documents with boundaries inside blocks; row 1: one document.
    cuts = np.repeat([1, 2, 3], [T // 3, T // 7, T - T // 3 - T // 7])
    return q, k, v, jnp.asarray(np.stack([cuts, np.ones(T, int)]), jnp.int32)


# (T, K, packed, window): T=256 is 4 blocks, T=250 and 77 are padded; K=2 is GQA (R=2), K=1 is MQA.
CASES = {
    "causal": (256, 2, False, None),
    "packed": (256, 2, True, None),
    "window": (256, 2, False, 100),
    "packed+window": (250, 2, True, 70),
    "mqa+packed": (250, 1, True, None),
    "mqa+window-in-block": (256, 1, False, 30),
    "mha+short": (77, 4, True, 20),
}


def _loss(kernel, q, k, v, seg, window):
    out = kernel(q, k, v, segment_ids_BT=seg, window=window)
    return jnp.sum(out * jnp.sin(q)), out  # a cotangent that differs per row, head and feature


@functools.cache
def _value_and_grad(kernel, window):
    return jax.jit(jax.value_and_grad(functools.partial(_loss, kernel, window=window), argnums=(0, 1, 2),
                                      has_aux=True))


@pytest.mark.parametrize("case", CASES)
def test_flash_equals_reference_forward_and_gradients(case):
    T, K, packed, window = CASES[case]
    q, k, v, seg = _inputs(T, K)
    seg = seg if packed else None
    (_, want), want_grads = _value_and_grad(attention.reference, window)(q, k, v, seg)
    (_, got), got_grads = _value_and_grad(functools.partial(flash, block=BLOCK), window)(q, k, v, seg)
    np.testing.assert_allclose(got, want, **TOL)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, **TOL, err_msg=f"d{name}")


def test_flash_gradients_under_vmap():
    """Population training vmaps the step over stacked states: the custom VJP and its loops batch."""
    q, k, v, seg = _inputs(130, 2)
    stack = [jnp.stack([x, 2 * x]) for x in (q, k, v)]

    def grads(kernel):
        step = jax.grad(lambda q, k, v: _loss(kernel, q, k, v, seg, 40)[0], argnums=(0, 1, 2))
        return jax.jit(jax.vmap(step))(*stack)

    for g, w in zip(grads(functools.partial(flash, block=BLOCK)), grads(attention.reference), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_flash_bfloat16_is_close_to_reference():
    q, k, v, seg = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _inputs(256, 2))
    want = attention.reference(q, k, v, segment_ids_BT=seg, window=100)
    got = jax.jit(functools.partial(flash, block=BLOCK, window=100))(q, k, v, segment_ids_BT=seg)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2)


def test_flash_through_attend_and_the_tiny_model():
    """`attention.impl=flash` reaches the kernel through attend(); the tiny model's logits equal the
    reference's with packed documents and a sliding window on two layers (T = 160: one block, padded)."""
    q, k, v, _ = _inputs(256, 2)
    assert attention.resolve("flash", q, k) == "flash"
    assert attention.resolve("flash", q, k, cached=True) == "blockwise"  # decoding over a cache
    config = model_config(load_config(TINY), vocab_size=1024).replace(
        use_sliding_window=True, sliding_window=50, max_window_layers=2)
    params = init_params(config, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (2, 160)), jnp.int32)
    segment_ids = jnp.asarray(np.stack([np.repeat([1, 2], [90, 70]), np.ones(160, int)]), jnp.int32)
    forward = jax.jit(logits, static_argnums=0, static_argnames="attention_impl")
    want = forward(config, params, tokens, segment_ids=segment_ids, attention_impl="reference")
    got = forward(config, params, tokens, segment_ids=segment_ids, attention_impl="flash")
    np.testing.assert_allclose(got, want, **TOL)


def _backward_temp_bytes(kernel, T: int) -> int:
    q = jax.ShapeDtypeStruct((1, T, 2, 64), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v)), argnums=(0, 1, 2)))
    return grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU compiler's memory analysis")
def test_flash_backward_memory_is_linear_in_T():
    """Doubling T doubles flash's temporaries (about) and quadruples the reference's."""
    flash_bytes = [_backward_temp_bytes(flash, T) for T in (2048, 4096)]
    reference_bytes = [_backward_temp_bytes(attention.reference, T) for T in (2048, 4096)]
    assert flash_bytes[1] < 2.5 * flash_bytes[0]
    assert reference_bytes[1] > 3.5 * reference_bytes[0]
    assert flash_bytes[1] * 8 < reference_bytes[1]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_auto_takes_flash_on_cpu_from_2048_queries():
    short, long = jnp.zeros((1, attention.FLASH_FROM - 1, N, H)), jnp.zeros((1, attention.FLASH_FROM, N, H))
    assert attention.resolve("auto", short, short) == "blockwise"
    assert attention.resolve("auto", long, long) == "flash"
    assert attention.resolve("auto", long, long, cached=True) == "blockwise"


def test_flash_refuses_a_cache():
    q, k, v, _ = _inputs(64, 2)
    with pytest.raises(ValueError, match="self-attention only"):
        flash(q, k, v, q_offset=3)
