"""Memory-linear causal attention for training: a blockwise kernel with its own VJP (flash attention in XLA).

Why: `reference` and `blockwise` keep every [T, S] block of probabilities for the backward pass, so their
activation memory grows as T^2 (8 GiB per head-pair at T = 32K in float32). Here the forward keeps, per query
block, a running max and sum of the scores and saves only the output and the log-sum-exp (LSE) of each row;
the backward recomputes each block's scores from q, k and the LSE. Peak memory is O(T x block).

Both passes are loops (`lax.fori_loop`) over square blocks of `block` slots and visit only the key blocks a
query block can see: those at or below the diagonal, and with a window only the last ceil(window / block) + 1
of them. Inside a block the mask is `attention._visible`'s: causal, same segment, inside the window. Scores,
sums and gradients accumulate in float32 whatever the compute dtype; q, k, v and the output keep it.

T that is not a multiple of the block is padded at the end: a real query never sees a padded key (causal) and
a padded query's output is dropped, so its cotangent is zero and it adds nothing to dk and dv.
Shapes as in attention.py: B batch, T slots, N query heads, K kv heads, R = N // K, H head_dim; Tp the padded
length, b the block, nb the number of blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 128  # slots per block: the fastest of 64..1024 on 2 CPU cores at T = 4K and 16K (docs/long-context.md)
F32 = jnp.float32


def _mask(i, j, b: int, seg_q_Bb, seg_k_Bb, window: int | None):
    """[B or 1, 1, 1, b, b] booleans for query block i and key block j (slot indices inside the padded T)."""
    q_slot = i * b + jnp.arange(b)
    k_slot = j * b + jnp.arange(b)
    vis_bb = k_slot[None, :] <= q_slot[:, None]
    if window is not None:
        vis_bb = vis_bb & (q_slot[:, None] - k_slot[None, :] < window)
    vis_1bb = vis_bb[None]
    if seg_q_Bb is not None:
        vis_1bb = vis_1bb & (seg_q_Bb[:, :, None] == seg_k_Bb[:, None, :])
    return vis_1bb[:, None, None]


def _key_range(i, b: int, window: int | None):
    """The key blocks [lo, i] that query block i can see."""
    if window is None:
        return 0, i + 1
    return jnp.maximum(0, (i * b - window + 1) // b), i + 1


def _query_range(j, b: int, nb: int, window: int | None):
    """The query blocks [j, hi] that can see key block j."""
    if window is None:
        return j, nb
    return j, jnp.minimum(nb, (j * b + b - 1 + window - 1) // b + 1)


def _slice(x, start, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _blocks(b: int, seg_BTp):
    """The segment-id slice of block i, or None."""
    return (lambda i: None) if seg_BTp is None else (lambda i: _slice(seg_BTp, i * b, b))


def _scores(q_BKRbH, k_BbKH, scale):
    """float32 scores [B, K, R, b(q), b(k)]."""
    s = jnp.einsum("bqkrh,bskh->bkrqs", q_BKRbH, k_BbKH, preferred_element_type=F32)
    return s * scale


def _forward(q_BTKRH, k_BTKH, v_BTKH, seg_BTp, b: int, window: int | None):
    """(out [B, Tp, K, R, H] in q's dtype, lse [B, K, R, Tp] float32)."""
    B, Tp, K, R, H = q_BTKRH.shape
    nb, scale = Tp // b, H**-0.5
    seg = _blocks(b, seg_BTp)

    def query_block(i, carry):
        out_BTKRH, lse_BKRT = carry
        q_bKRH = _slice(q_BTKRH, i * b, b)

        def key_block(j, acc):
            m_BKRq, l_BKRq, o_BKRqH = acc
            k_bKH, v_bKH = _slice(k_BTKH, j * b, b), _slice(v_BTKH, j * b, b)
            vis = _mask(i, j, b, seg(i), seg(j), window)
            s_BKRqs = jnp.where(vis, _scores(q_bKRH, k_bKH, scale), -jnp.inf)
            m_new = jnp.maximum(m_BKRq, s_BKRqs.max(axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # a row with nothing visible yet
            p_BKRqs = jnp.exp(s_BKRqs - m_safe[..., None])
            alpha = jnp.exp(m_BKRq - m_safe)
            o_new = o_BKRqH * alpha[..., None] + jnp.einsum(
                "bkrqs,bskh->bkrqh", p_BKRqs.astype(v_bKH.dtype), v_bKH, preferred_element_type=F32)
            return m_new, l_BKRq * alpha + p_BKRqs.sum(axis=-1), o_new

        init = (jnp.full((B, K, R, b), -jnp.inf, F32), jnp.zeros((B, K, R, b), F32),
                jnp.zeros((B, K, R, b, H), F32))
        lo, hi = _key_range(i, b, window)
        m_BKRq, l_BKRq, o_BKRqH = jax.lax.fori_loop(lo, hi, key_block, init)
        o_bKRH = (o_BKRqH / l_BKRq[..., None]).transpose(0, 3, 1, 2, 4).astype(q_BTKRH.dtype)
        out_BTKRH = jax.lax.dynamic_update_slice_in_dim(out_BTKRH, o_bKRH, i * b, axis=1)
        lse_BKRT = jax.lax.dynamic_update_slice_in_dim(lse_BKRT, m_BKRq + jnp.log(l_BKRq), i * b, axis=3)
        return out_BTKRH, lse_BKRT

    init = (jnp.zeros_like(q_BTKRH), jnp.zeros((B, K, R, Tp), F32))
    return jax.lax.fori_loop(0, nb, query_block, init)


def _backward(q_BTKRH, k_BTKH, v_BTKH, seg_BTp, out_BTKRH, lse_BKRT, dout_BTKRH, b: int, window: int | None):
    """(dq, dk, dv): one loop over key blocks, an inner loop over the query blocks that see each; dq is
    accumulated in place (float32) across key blocks."""
    B, Tp, K, R, H = q_BTKRH.shape
    nb, scale = Tp // b, H**-0.5
    seg = _blocks(b, seg_BTp)
    # D_t = sum_h dout . out: the softmax's Jacobian term, one float per query row.
    delta_BKRT = jnp.einsum("btkrh,btkrh->bkrt", dout_BTKRH, out_BTKRH, preferred_element_type=F32)

    def key_block(j, carry):
        dq_BTKRH, dk_BTKH, dv_BTKH = carry
        k_bKH, v_bKH = _slice(k_BTKH, j * b, b), _slice(v_BTKH, j * b, b)

        def query_block(i, acc):
            dq_BTKRH, dk_bKH, dv_bKH = acc
            q_bKRH, do_bKRH = _slice(q_BTKRH, i * b, b), _slice(dout_BTKRH, i * b, b)
            lse_BKRq, delta_BKRq = _slice(lse_BKRT, i * b, b, axis=3), _slice(delta_BKRT, i * b, b, axis=3)
            vis = _mask(i, j, b, seg(i), seg(j), window)
            p_BKRqs = jnp.where(vis, jnp.exp(_scores(q_bKRH, k_bKH, scale) - lse_BKRq[..., None]), 0.0)
            dv_bKH = dv_bKH + jnp.einsum("bkrqs,bqkrh->bskh", p_BKRqs.astype(do_bKRH.dtype), do_bKRH,
                                         preferred_element_type=F32)
            dp_BKRqs = jnp.einsum("bqkrh,bskh->bkrqs", do_bKRH, v_bKH, preferred_element_type=F32)
            ds_BKRqs = (p_BKRqs * (dp_BKRqs - delta_BKRq[..., None]) * scale).astype(q_bKRH.dtype)
            dk_bKH = dk_bKH + jnp.einsum("bkrqs,bqkrh->bskh", ds_BKRqs, q_bKRH, preferred_element_type=F32)
            dq_bKRH = _slice(dq_BTKRH, i * b, b) + jnp.einsum("bkrqs,bskh->bqkrh", ds_BKRqs, k_bKH,
                                                               preferred_element_type=F32)
            dq_BTKRH = jax.lax.dynamic_update_slice_in_dim(dq_BTKRH, dq_bKRH, i * b, axis=1)
            return dq_BTKRH, dk_bKH, dv_bKH

        lo, hi = _query_range(j, b, nb, window)
        init = (dq_BTKRH, jnp.zeros((B, b, K, H), F32), jnp.zeros((B, b, K, H), F32))
        dq_BTKRH, dk_bKH, dv_bKH = jax.lax.fori_loop(lo, hi, query_block, init)
        dk_BTKH = jax.lax.dynamic_update_slice_in_dim(dk_BTKH, dk_bKH.astype(dk_BTKH.dtype), j * b, axis=1)
        dv_BTKH = jax.lax.dynamic_update_slice_in_dim(dv_BTKH, dv_bKH.astype(dv_BTKH.dtype), j * b, axis=1)
        return dq_BTKRH, dk_BTKH, dv_BTKH

    init = (jnp.zeros(q_BTKRH.shape, F32), jnp.zeros_like(k_BTKH), jnp.zeros_like(v_BTKH))
    dq_BTKRH, dk_BTKH, dv_BTKH = jax.lax.fori_loop(0, nb, key_block, init)
    return dq_BTKRH.astype(q_BTKRH.dtype), dk_BTKH, dv_BTKH


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_BTKRH, k_BTKH, v_BTKH, seg_BTp, b: int, window: int | None):
    return _forward(q_BTKRH, k_BTKH, v_BTKH, seg_BTp, b, window)[0]


def _flash_fwd(q_BTKRH, k_BTKH, v_BTKH, seg_BTp, b, window):
    out_BTKRH, lse_BKRT = _forward(q_BTKRH, k_BTKH, v_BTKH, seg_BTp, b, window)
    return out_BTKRH, (q_BTKRH, k_BTKH, v_BTKH, seg_BTp, out_BTKRH, lse_BKRT)


def _flash_bwd(b, window, residuals, dout_BTKRH):
    q, k, v, seg_BTp, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, seg_BTp, out, lse, dout_BTKRH, b, window)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, window=None, q_offset=None, block: int = BLOCK):
    """Causal GQA self-attention with the signature of `attention.reference`, memory O(T x block) in both
    passes. Self-attention only: attention.resolve sends decoding over a cache (`q_offset`) to blockwise."""
    if q_offset is not None:
        raise ValueError("flash attention is self-attention only; decode with reference or blockwise")
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    if k_BSKH.shape[1] != T or N % K:
        raise ValueError(f"flash attention needs as many keys as queries and N % K == 0, got q {q_BTNH.shape}, "
                         f"k {k_BSKH.shape}")
    b = min(block, -(-T // 8) * 8)  # one block (rounded to 8 slots) when T is short
    pad = -T % b
    q_BTKRH = q_BTNH.reshape(B, T, K, N // K, H)
    k_BTKH, v_BTKH, seg_BTp = k_BSKH, v_BSKH, segment_ids_BT
    if pad:
        q_BTKRH = jnp.pad(q_BTKRH, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        k_BTKH, v_BTKH = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k_BSKH, v_BSKH))
        if seg_BTp is not None:
            seg_BTp = jnp.pad(seg_BTp, ((0, 0), (0, pad)))
    out_BTKRH = _flash(q_BTKRH, k_BTKH, v_BTKH, seg_BTp, b, window)
    return out_BTKRH[:, :T].reshape(B, T, N, H)
