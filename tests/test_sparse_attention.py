"""Sparse prefill (qwenjax/attention_sparse.py): with budgets covering every key it is dense attention; on a
small case its vertical + slash selection, outputs and kept fraction equal an independent numpy version of
MInference's pattern; its budgets are validated and travel in the kernel name; a decoding query stays dense."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from qwenjax import attention
from qwenjax import attention_sparse as sp
from qwenjax.commands.eval import _attention
from qwenjax.errors import UserError
from qwenjax.evals.forward import token_losses
from qwenjax.model import init_params
from qwenjax.run_config import load_config, model_config
from qwenjax.run_sections import AttentionSection

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

B, T, N, K, H = 2, 200, 4, 2, 16
SMALL = sp.Budgets(vertical=10, slash=20, last_q=16, sink=4, local=8)
FULL = sp.Budgets(vertical=T, slash=T, last_q=16, sink=0, local=1)
TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(seed=0, S=T):
    rng = np.random.default_rng(seed)
    shapes = ((B, T, N, H), (B, S, K, H), (B, S, K, H))
    return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


def _segments():
    return jnp.asarray(np.stack([np.repeat([1, 2, 3], [90, 50, 60]), np.ones(T, int)]), jnp.int32)


@pytest.mark.parametrize("case", [dict(), dict(window=50), dict(segment_ids_BT="packed", window=70)])
def test_full_budgets_equal_dense(case):
    q, k, v = _qkv()
    kw = {**case, "segment_ids_BT": _segments()} if "segment_ids_BT" in case else case
    want = attention.reference(q, k, v, **kw)
    got = jax.jit(lambda q, k, v: sp.sparse(q, k, v, budgets=FULL, **kw))(q, k, v)
    np.testing.assert_allclose(got, want, **TOL)
    assert sp.kept_fraction(q, k, budgets=FULL, **kw) == 1.0


def test_full_budgets_equal_dense_over_a_cache():
    """A chunk of prefill (queries at slots 100..199) over a cache of 256 slots, the rest unwritten."""
    q, k, v = _qkv()
    kc, vc = (jnp.zeros((B, 256, K, H)).at[:, :T].set(x) for x in (k, v))
    offset = jnp.int32(100)
    want = attention.reference(q[:, 100:], kc, vc, q_offset=offset)
    np.testing.assert_allclose(sp.sparse(q[:, 100:], kc, vc, q_offset=offset, budgets=FULL), want, **TOL)


def _numpy_pattern(q, k, budgets: sp.Budgets):
    """[B, N, T, T] booleans: the selected (query, key) pairs of MInference's vertical + slash, self-attention."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    lq = budgets.last_q
    nv, ns = budgets.counts(T)
    mask = np.zeros((B, N, T, T), bool)
    columns, diagonals = {}, {}
    for b in range(B):
        for n in range(N):
            kn = k[b, :, n // (N // K)]
            s = q[b, T - lq:, n] @ kn.T / np.sqrt(H)
            for i in range(lq):
                s[i, T - lq + i + 1:] = -np.inf
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            col = p.sum(0)
            col[:budgets.sink] = np.inf
            diag = np.zeros(T)
            for i in range(lq):
                t = T - lq + i
                for key in range(t + 1):
                    diag[t - key] += p[i, key]
            diag[:budgets.local] = np.inf
            columns[b, n] = set(np.argsort(-col, kind="stable")[:nv].tolist())
            diagonals[b, n] = set(np.argsort(-diag, kind="stable")[:ns].tolist())
            t_, key_ = np.arange(T)[:, None], np.arange(T)[None, :]
            mask[b, n] = (key_ <= t_) & (np.isin(key_, list(columns[b, n]))
                                         | np.isin(t_ - key_, list(diagonals[b, n])))
    return mask, columns, diagonals


def test_selection_outputs_and_kept_fraction_match_numpy():
    q, k, v = _qkv(seed=1)
    mask, columns, diagonals = _numpy_pattern(q, k, SMALL)
    vidx, didx = sp.select(q, k, SMALL, q_slot_T=jnp.arange(T))
    for (b, n), want in columns.items():
        assert set(np.asarray(vidx[b, n]).tolist()) == want
        assert set(np.asarray(didx[b, n]).tolist()) == diagonals[b, n]
    # outputs: an exact softmax over the selected keys, in float64
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    kN, vN = (np.repeat(x, N // K, axis=2) for x in (kn, vn))
    s = np.einsum("btnh,bsnh->bnts", qn, kN) / np.sqrt(H)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bnts,bsnh->btnh", p, vN)
    got = jax.jit(lambda q, k, v: attention.attend(q, k, v, impl=AttentionSection(
        impl="sparse", sparse_vertical=10, sparse_slash=20, sparse_last_q=16, sparse_sink=4,
        sparse_local=8).kernel))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    kept = sp.kept_fraction(q, k, budgets=SMALL)
    assert kept == pytest.approx(mask.sum() / (B * N * T * (T + 1) / 2), rel=1e-6)
    assert 0 < kept < 0.5


def test_stats_count_what_ran():
    q, k, v = _qkv()
    sp.reset_stats()
    jax.jit(lambda q, k, v: sp.sparse(q, k, v, budgets=FULL))(q, k, v).block_until_ready()
    jax.effects_barrier()
    stats = sp.stats_fraction()
    assert stats["causal_pairs"] == B * N * T * (T + 1) / 2
    assert stats["kept_fraction"] == 1.0
    assert stats["estimate_pairs"] == B * N * FULL.last_q * T


def test_budgets_travel_in_the_name_and_are_checked():
    section = AttentionSection(impl="sparse", sparse_vertical=0.1, sparse_slash=300)
    assert sp.parse(section.kernel) == sp.Budgets(vertical=0.1, slash=300)
    assert sp.parse("sparse") == sp.Budgets()
    assert sp.parse("blockwise") is None
    assert sp.Budgets(vertical=0.1, slash=0.5, sink=30, local=100).counts(1000) == (100, 500)
    assert sp.Budgets().counts(200) == (200, 200)
    assert AttentionSection(impl="flash", sparse_vertical=5).kernel == "flash"
    for bad in (dict(sparse_vertical=0), dict(sparse_slash=1.5), dict(sparse_last_q=0), dict(sparse_local=0),
                dict(sparse_sink=-1), dict(sparse_vertical=True)):
        with pytest.raises(UserError, match="attention.sparse_"):
            AttentionSection(impl="sparse", **bad)
    with pytest.raises(UserError, match="KEY=NUMBER"):
        sp.parse("sparse:columns=3")


def test_decoding_stays_dense():
    q, k, v = _qkv()
    assert attention.resolve("sparse", q[:, :1], k, cached=True) == "blockwise"
    assert attention.resolve("sparse", q[:, :8], k, cached=True) == "sparse"
    assert attention.resolve(sp.spec(SMALL), q, k) == sp.spec(SMALL)


def test_eval_command_takes_attention_overrides():
    """`qwenjax eval ... attention.impl=sparse attention.sparse_vertical=0.1`: the attention keys are taken out
    of the model overrides; an unknown one is one UserError line."""
    args = argparse.Namespace(overrides=["model.rope_theta=1e5", "attention.impl=sparse",
                                         "attention.sparse_vertical=0.1"])
    section = _attention(args)
    assert args.overrides == ["model.rope_theta=1e5"]
    assert sp.parse(section.kernel) == sp.Budgets(vertical=0.1)
    with pytest.raises(UserError, match="attention.sparse_columns is not an attention key"):
        _attention(argparse.Namespace(overrides=["attention.sparse_columns=3"]))


def test_tiny_model_chunked_prefill_default_budgets_equal_dense():
    """Under 1000 keys MInference's default budgets keep every pair: the evals' chunked prefill into a KV
    cache (two chunks of 48 under lax.scan, the query offset traced) gives the dense losses."""
    config = model_config(load_config(TINY), vocab_size=1024)
    params = init_params(config, 0)
    seq = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (2, 97)), jnp.int32)
    want = token_losses(config, params, seq, chunk=48, impl="blockwise")
    np.testing.assert_allclose(token_losses(config, params, seq, chunk=48, impl="sparse"), want, **TOL)


def test_training_steps_carry_the_sparse_budgets():
    """The train step's kernel is the name with the budgets, not the bare `sparse` (the defaults)."""
    from conftest import TINY

    from qwenjax.run_config import load_config
    from qwenjax.train.step import make_step_static

    cfg = load_config(TINY, ["attention.impl=sparse", "attention.sparse_vertical=8", "attention.sparse_slash=16"])
    assert make_step_static(cfg).attention_impl == cfg.attention.kernel
    assert "vertical=8," in cfg.attention.kernel and "slash=16," in cfg.attention.kernel
