"""Context parallelism: attention over a sequence split along the `context` mesh axis.

Why: at 32K-128K tokens one sequence's activations outgrow a chip, and batch axes cannot split a single
sequence. The rules table (`train/sharding.py`) maps the activations' `length` axis to the `context` mesh
axis, so every matmul, norm and MLP runs on its own slice of the sequence with no communication; only
attention needs keys from other slices. `attend` below is what the model calls: with no context mesh
active (one device, decoding, tests) it is `qwenjax.attention.attend`; under `activation_sharding` on a mesh
with context > 1 it runs attention inside `jax.shard_map`, each device keeping its own query slice:

- `ring` (the default): K/V blocks travel around the ring with `lax.ppermute`; each step attends to one
  block and merges it into a running (max, sum, output) in float32 (online softmax); blocks above the causal
  diagonal are skipped with `lax.cond`, and each step is rematerialised in the backward (`jax.checkpoint`),
  so a device holds one [t, t] block of scores at a time, never [t, T].
- `allgather`: all-gather the K/V (and segment ids) of the other slices along `context`, then attend with
  the reference numerics over global slots. Simpler, but every device computes (and keeps for the backward)
  its queries against all T keys, the masked half included.

Both use global slots (query slot = slice index x t + local slot) for the causal mask and compare segment ids
across slices; the backward is JAX's autodiff of the shard_map (ppermute transposes to the reverse ring,
all-gather to a reduce-scatter of dK/dV).

docs/long-context.md ("Context parallelism") has the measurement behind the default (ring: 1.4x to 4x faster
forward+backward than allgather on 8 simulated CPU devices, 2.4x less temporary memory at T = 8K). Global RoPE positions
need nothing here: positions come with the batch and are sharded like the tokens. Shapes as in attention.py,
t = the local slice of T (T / context).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwenjax.attention import _attend_block, _visible
from qwenjax.attention import attend as attend_local

AXIS = "context"  # the mesh axis the sequence is split over
STRATEGIES = ("allgather", "ring")
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ContextMesh:
    """The active mesh and the rules table as a function (logical axes, shape) -> PartitionSpec."""

    mesh: jax.sharding.Mesh
    spec: Callable[[tuple, tuple], P]
    strategy: str = "ring"


# Set by `qwenjax.train.sharding.activation_sharding` on a mesh whose context axis is > 1; unset = no split.
CONTEXT: contextvars.ContextVar = contextvars.ContextVar("context_mesh", default=None)


@contextlib.contextmanager
def context_mesh(mesh, spec: Callable[[tuple, tuple], P], strategy: str = "ring"):
    """Within this block, `attend` splits attention over `mesh`'s context axis (when it is > 1)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context-parallel strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    if mesh.shape.get(AXIS, 1) == 1:
        yield
        return
    token = CONTEXT.set(ContextMesh(mesh, spec, strategy))
    try:
        yield
    finally:
        CONTEXT.reset(token)


def attend(q_BTNH, k_BSKH, v_BSKH, *, impl: str = "auto", segment_ids_BT=None, window: int | None = None,
           q_offset=None) -> jax.Array:
    """`qwenjax.attention.attend`, split over the context axis when one is active (self-attention only)."""
    ctx = CONTEXT.get()
    if ctx is None or q_offset is not None:
        return attend_local(q_BTNH, k_BSKH, v_BSKH, impl=impl, segment_ids_BT=segment_ids_BT, window=window,
                            q_offset=q_offset)
    q_spec = ctx.spec(("batch", "length", "heads", None), q_BTNH.shape)
    kv_spec = ctx.spec(("batch", "length", "kv_heads", None), k_BSKH.shape)
    if q_spec[1] != AXIS or kv_spec[1] != AXIS:  # the length does not divide: GSPMD's replicated attention
        return attend_local(q_BTNH, k_BSKH, v_BSKH, impl=impl, segment_ids_BT=segment_ids_BT, window=window)
    if q_spec[2] != kv_spec[2]:  # query heads split but kv heads not: keep whole heads (GQA maps n -> n // R)
        q_spec, kv_spec = P(*q_spec[:2], None, None), P(*kv_spec[:2], None, None)
    seg_spec = P(*q_spec[:2])
    B, T = q_BTNH.shape[:2]
    seg_BT = jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
    local = allgather_local if ctx.strategy == "allgather" else ring_local
    fn = jax.shard_map(lambda q, k, v, s: local(q, k, v, s, window=window), mesh=ctx.mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)
    return fn(q_BTNH, k_BSKH, v_BSKH, seg_BT)


def _slots(t: int):
    """Global slots of this device's query slice."""
    return jax.lax.axis_index(AXIS) * t + jnp.arange(t)


def allgather_local(q_BtNH, k_BtKH, v_BtKH, seg_Bt, *, window: int | None):
    """One device's queries against the gathered keys of every slice (reference numerics)."""
    t = q_BtNH.shape[1]
    k_BTKH = jax.lax.all_gather(k_BtKH, AXIS, axis=1, tiled=True)
    v_BTKH = jax.lax.all_gather(v_BtKH, AXIS, axis=1, tiled=True)
    seg_BT = jax.lax.all_gather(seg_Bt, AXIS, axis=1, tiled=True)
    visible_BtT = _visible(_slots(t), jnp.arange(k_BTKH.shape[1]), seg_Bt, seg_BT, window)
    return _attend_block(q_BtNH, k_BTKH, v_BTKH, visible_BtT)


def _block_stats(q_BtKRH, k_BsKH, v_BsKH, visible_Bts):
    """(max [B,K,R,t], sum [B,K,R,t], unnormalised output [B,t,K,R,H]) of one key block, float32. Scores
    are rounded to the compute dtype as `reference` does; a row with no visible key has sum 0."""
    H, dtype = q_BtKRH.shape[-1], q_BtKRH.dtype
    s = jnp.einsum("btkrh,bskh->bkrts", q_BtKRH, k_BsKH)
    s = (s.astype(F32) * H**-0.5).astype(dtype).astype(F32)
    vis = visible_Bts[:, None, None]
    s = jnp.where(vis, s, jnp.finfo(F32).min)
    m = jnp.max(s, axis=-1)
    p = jnp.where(vis, jnp.exp(s - m[..., None]), 0.0)
    o = jnp.einsum("bkrts,bskh->btkrh", p, v_BsKH.astype(F32))
    return m, jnp.sum(p, axis=-1), o


def _by_row(x_BKRt):
    """[B, K, R, t] -> [B, t, K, R, 1], to scale outputs row by row."""
    return x_BKRt.transpose(0, 3, 1, 2)[..., None]


def ring_local(q_BtNH, k_BtKH, v_BtKH, seg_Bt, *, window: int | None):
    """One device's queries against the K/V blocks passed around the ring, merged by online softmax."""
    B, t, N, H = q_BtNH.shape
    K = k_BtKH.shape[2]
    n = jax.lax.axis_size(AXIS)
    me = jax.lax.axis_index(AXIS)
    q_BtKRH = q_BtNH.reshape(B, t, K, N // K, H)
    q_slot = _slots(t)
    perm = [(j, (j + 1) % n) for j in range(n)]  # after s steps, device c holds the block of slice c - s
    m = jnp.full((B, K, N // K, t), jnp.finfo(F32).min, F32)
    lsum = jnp.zeros((B, K, N // K, t), F32)
    o = jnp.zeros((B, t, K, N // K, H), F32)
    kv = (k_BtKH, v_BtKH, seg_Bt)
    for step in range(n):
        src = (me - step) % n

        def merge(carry, kv=kv, src=src):
            m, lsum, o = carry
            k, v, seg = kv
            visible = _visible(q_slot, src * t + jnp.arange(t), seg_Bt, seg, window)
            bm, bl, bo = _block_stats(q_BtKRH, k, v, visible)
            new_m = jnp.maximum(m, bm)
            a, b = jnp.exp(m - new_m), jnp.exp(bm - new_m)
            return new_m, lsum * a + bl * b, o * _by_row(a) + bo * _by_row(b)

        carry = (m, lsum, o)
        merge = jax.checkpoint(merge)  # the backward recomputes the block's scores: no [t, t] residuals
        m, lsum, o = merge(carry) if step == 0 else jax.lax.cond(src <= me, merge, lambda c: c, carry)
        if step < n - 1:
            kv = tuple(jax.lax.ppermute(x, AXIS, perm) for x in kv)
    out = o / _by_row(lsum)
    return out.astype(q_BtNH.dtype).reshape(B, t, N, H)
