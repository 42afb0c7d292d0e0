"""Attention kernels behind one signature, picked by the run option `attention.impl` (never in config.json).

Why a registry: the math is fixed by the checkpoint, but the fastest way to compute it depends on the
machine, so the kernel is a runtime choice like the mesh. Every kernel computes causal grouped-query attention

    out[b, t, n] = sum_s softmax_s(q[b, t, n] . k[b, s, n // R] / sqrt(H))  v[b, s, n // R]

over the keys s that the query t may see: s <= t (slots, not RoPE positions), the same segment (packed
documents never see each other) and, on sliding-window layers, t - s < window. Shapes are suffixes as in
model.py: B batch, T queries, S keys, N query heads, K kv heads, R = N // K, H head_dim.

Kernels (`attention.impl`):
- `reference`: one dense block with HF's numerics (scores in the compute dtype, softmax in float32). The
  definition that the other kernels are tested against.
- `blockwise`: the same numerics in query blocks, each seeing only the keys up to its own end (and, with a
  window, from its start - window + 1): the masked part is never computed.
- `flash`: memory-linear blockwise attention with its own VJP (`attention_flash.py`): saves only the output
  and the log-sum-exp, recomputes block scores in the backward, O(T x block) memory; for long-T training.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on NVIDIA GPUs
  (bfloat16/float16). Segment ids become a dense [B, 1, T, S] mask: the public API takes no segment ids.
- `splash`: the Pallas TPU splash-attention kernel (block-sparse flash attention), vmapped over the batch.
- `sparse`: MInference's vertical + slash sparse prefill (`attention_sparse.py`): approximate, so never
  picked by auto; its budgets (`attention.sparse_*`) travel in the name (`sparse:vertical=...`). Over a cache
  a chunk of prefill is sparse, a single decoding query dense (blockwise).
- `auto`: cudnn on a GPU and splash on a TPU when they support the shapes and dtype, else blockwise. On CPU
  blockwise is the faster XLA kernel: at the tiny config (T=64) it is one block, the same program as
  reference (both 2 ms forward+backward for B=32), and at the bench shape (B=8, T=512, 6 heads, head_dim 64)
  it takes 70 ms against 150 ms (float32, 2 CPU cores). From T = 2048 (`FLASH_FROM`) auto takes flash on CPU:
  forward+backward 2.5x to 6x faster than blockwise at T = 2K..16K, in O(T) memory (docs/long-context.md); below,
  the two are within the noise of a shared machine, and blockwise is 1.5x faster at T = 64.

cudnn and splash run only on their hardware; asked for elsewhere they raise one `UserError` line. Decoding over
a KV cache (`q_offset` given) always uses the XLA kernels: the flash kernels assume queries and keys start
at the same slot. Add a kernel by writing a function with the signature of `reference`, adding it to `KERNELS`
and, if it needs special hardware, to `_PLATFORM` and `_PROBLEMS`, and its name to
`run_sections.ATTENTION_IMPLS` (the JAX-free list the run config validates against; a test keeps them equal).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qwenjax import attention_sparse
from qwenjax.attention_flash import flash
from qwenjax.errors import UserError
from qwenjax.run_sections import ATTENTION_IMPLS, did_you_mean

AUTO = "auto"
FLASH_FROM = 2048  # on CPU, auto takes flash from this many queries (measured: the module docstring)


def _visible(q_slot_t, k_slot_s, seg_q_Bt, seg_k_Bs, window: int | None):
    """[B or 1, t, s] booleans: may query slot t see key slot s (causal, same segment, inside the window)."""
    visible_ts = k_slot_s[None, :] <= q_slot_t[:, None]
    if window is not None:
        visible_ts = visible_ts & ((q_slot_t[:, None] - k_slot_s[None, :]) < window)
    visible_1ts = visible_ts[None]
    if seg_q_Bt is None:
        return visible_1ts
    return visible_1ts & (seg_q_Bt[:, :, None] == seg_k_Bs[:, None, :])


def _attend_block(q_BtNH, k_BsKH, v_BsKH, visible_Bts):
    """softmax(q k^T / sqrt(H), masked) v for one block of queries, with HF's numerics."""
    B, t, N, H = q_BtNH.shape
    K = k_BsKH.shape[2]
    q_BtKRH = q_BtNH.reshape(B, t, K, N // K, H)
    scores_BKRts = jnp.einsum("btkrh,bskh->bkrts", q_BtKRH, k_BsKH)
    scores_BKRts = (scores_BKRts.astype(jnp.float32) * H**-0.5).astype(q_BtNH.dtype)  # scale unrounded
    scores_BKRts = jnp.where(visible_Bts[:, None, None], scores_BKRts, jnp.finfo(scores_BKRts.dtype).min)
    probs_BKRts = jax.nn.softmax(scores_BKRts.astype(jnp.float32), axis=-1).astype(q_BtNH.dtype)
    return jnp.einsum("bkrts,bskh->btkrh", probs_BKRts, v_BsKH).reshape(B, t, N, H)


def reference(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, window=None, q_offset=None):
    """All keys in one dense block. `q_offset`: the key slot of query 0 (the cache index when decoding;
    None = self-attention over the same T slots)."""
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    q_slot_T = jnp.arange(T) if q_offset is None else q_offset + jnp.arange(T)
    visible_BTS = _visible(q_slot_T, jnp.arange(S), segment_ids_BT, segment_ids_BT, window)
    return _attend_block(q_BTNH, k_BSKH, v_BSKH, visible_BTS)


def blockwise(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, window=None, q_offset=None):
    """Query blocks of max(64, T/16) rows, each against only the keys it can see: about half the work of
    `reference` causally, and 2x faster on CPU at T=512. Over a cache (`q_offset`), one block."""
    if q_offset is not None:
        return reference(q_BTNH, k_BSKH, v_BSKH, window=window, q_offset=q_offset)
    T = q_BTNH.shape[1]
    block = max(64, -(-T // 16))
    seg_BT = segment_ids_BT
    outs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        kv_start = 0 if window is None else max(0, start - window + 1)
        visible_Bts = _visible(jnp.arange(start, end), jnp.arange(kv_start, end),
                               None if seg_BT is None else seg_BT[:, start:end],
                               None if seg_BT is None else seg_BT[:, kv_start:end], window)
        outs.append(_attend_block(q_BTNH[:, start:end], k_BSKH[:, kv_start:end], v_BSKH[:, kv_start:end],
                                  visible_Bts))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def cudnn(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, window=None, q_offset=None,
          implementation: str = "cudnn"):
    """cuDNN flash attention. `implementation="xla"` runs the same call through XLA (the tests' CPU check
    of the arguments: causal, left window of window - 1 keys, segment mask)."""
    del q_offset  # attend() never sends a cache here
    mask_B1TS = None
    if segment_ids_BT is not None:
        mask_B1TS = segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, is_causal=True,
                                        local_window_size=None if window is None else (window - 1, 0),
                                        implementation=implementation)


def splash(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, window=None, q_offset=None, interpret=False):
    """Pallas splash attention, one example at a time (vmap). Single-device: on a mesh it must run under
    shard_map (not wired yet). `interpret=True` runs the kernel in the Pallas interpreter (tests on CPU)."""
    del q_offset  # attend() never sends a cache here
    # Imported on first use: the Pallas TPU package is TPU-only and adds ~0.1 s to every start-up elsewhere.
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    _, T, N, H = q_BTNH.shape
    kernel = _splash_kernel(T, k_BSKH.shape[1], N, window, interpret)
    q_BNTH = (q_BTNH.astype(jnp.float32) * H**-0.5).astype(q_BTNH.dtype).transpose(0, 2, 1, 3)  # no scale arg
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    if segment_ids_BT is None:
        out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
    else:
        out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, sa.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT))
    return out_BNTH.transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=32)
def _splash_kernel(T: int, S: int, N: int, window: int | None, interpret: bool):
    """The kernel for one shape (its block-sparsity tables are computed on the host, so built once)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # see splash()

    one_head = sa.CausalMask((T, S)) if window is None else sa.LocalMask((T, S), (window - 1, 0), offset=0)
    with jax.ensure_compile_time_eval():  # concrete tables even when first built inside a jit trace (cached)
        return sa.make_splash_mha(sa.MultiHeadMask([one_head] * N), head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


KERNELS: dict[str, Callable[..., jax.Array]] = {
    "reference": reference, "blockwise": blockwise, "flash": flash, "cudnn": cudnn, "splash": splash,
    "sparse": attention_sparse.sparse}
IMPLS = ATTENTION_IMPLS  # auto and the kernels
_PLATFORM = {"cudnn": ("gpu", "an NVIDIA GPU"), "splash": ("tpu", "a TPU")}


def _cudnn_problem(q_BTNH, k_BSKH) -> str | None:
    H = q_BTNH.shape[-1]
    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        return f"bfloat16 or float16 compute (model.dtype), got {q_BTNH.dtype}"
    if H % 8 or H > 128:
        return f"a head_dim that is a multiple of 8 and at most 128, got {H}"
    return None


def _splash_problem(q_BTNH, k_BSKH) -> str | None:
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    if T % 128 or S % 128:
        return f"sequence lengths that are multiples of 128 (its block size), got {T} queries and {S} keys"
    return None


_PROBLEMS = {"cudnn": _cudnn_problem, "splash": _splash_problem}


def resolve(impl: str, q_BTNH, k_BSKH, *, cached: bool = False) -> str:
    """The kernel that `impl` stands for on this backend and these shapes (`cached`: decoding over a KV
    cache, which the XLA kernels do); a UserError line when it cannot run here."""
    if attention_sparse.parse(impl) is not None:  # its budgets ride in the name; one decoding query: dense
        return "blockwise" if cached and q_BTNH.shape[1] == 1 else impl
    if impl not in IMPLS:
        raise UserError(f"attention.impl must be one of {', '.join(IMPLS)}, got {impl!r}" + did_you_mean(impl, IMPLS))
    backend = jax.default_backend()
    if impl in _PLATFORM and backend != _PLATFORM[impl][0]:
        raise UserError(f"attention.impl={impl} needs {_PLATFORM[impl][1]}, but JAX runs on {backend}; use "
                        f"attention.impl=auto (or reference, blockwise, flash)")
    if cached:
        return impl if impl in ("reference", "blockwise") else "blockwise"  # flash included: no cache
    if impl == AUTO:
        fits = [name for name, (platform, _) in _PLATFORM.items()
                if backend == platform and _PROBLEMS[name](q_BTNH, k_BSKH) is None]
        if fits:
            return fits[0]
        return "flash" if backend == "cpu" and q_BTNH.shape[1] >= FLASH_FROM else "blockwise"
    problem = _PROBLEMS[impl](q_BTNH, k_BSKH) if impl in _PROBLEMS else None
    if problem:
        raise UserError(f"attention.impl={impl} needs {problem}; use attention.impl=auto")
    return impl


def attend(q_BTNH, k_BSKH, v_BSKH, *, impl: str = AUTO, segment_ids_BT=None, window: int | None = None,
           q_offset=None) -> jax.Array:
    """Causal GQA attention [B, T, N, H] through the kernel `impl` names (resolved when traced).

    segment_ids_BT: packed-document ids (None = one segment); self-attention only. window: the sliding
    window in keys (None = all). q_offset: the key slot of query 0 when decoding over a cache of S slots.
    """
    if q_offset is not None and segment_ids_BT is not None:
        raise ValueError("segment ids apply to self-attention, not to decoding over a cache")
    name = resolve(impl, q_BTNH, k_BSKH, cached=q_offset is not None)
    budgets = attention_sparse.parse(name)
    kernel = KERNELS[name] if budgets is None else functools.partial(attention_sparse.sparse, budgets=budgets)
    return kernel(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=segment_ids_BT, window=window, q_offset=q_offset)
