"""Sparse prefill: MInference's "vertical + slash" attention pattern, computed exactly over the selected keys.

Why: at long context most of a head's attention mass sits on a few key columns (sinks, salient tokens) and a
few diagonals (local and periodic offsets). MInference (Jiang et al. 2024) estimates both from the last
`last_q` queries and attends every query only to them, cutting prefill FLOPs at a small loss.

The pattern, per (example, query head), as MInference's `vertical_and_slash_kernel`:
1. p = softmax over visible keys of the last `last_q` queries' scores against all S keys (float32).
2. vertical: column sums of p; the first `sink` keys forced in; the top `vertical` columns (at least `sink`).
3. slash: sums of p along each diagonal d = query slot - key slot >= 0; the `local` nearest diagonals
   (d < local) forced in; the top `slash` diagonals (at least `local`).
4. query t attends, with an exact softmax, to the union of the selected columns and the keys t - d of the
   selected diagonals, intersected with what it may see (causal, same segment, inside the window).
Unlike MInference's GPU kernel, which widens each diagonal to the 64 x 64 blocks it crosses, the selected set
is element-exact, so `kept_fraction` is the true share of (query, key) pairs computed. Budgets >= 1 are
counts; in (0, 1) they are fractions of the S keys. A budget covering all keys gives dense attention.

Cost: the columns are one [T, vertical] matmul; the diagonals gather [block, slash] keys per query block
(a `lax.map` over blocks bounds the gathered memory). Shapes as in attention.py: B, T, S, N, K, R, H; v and
s the numbers of selected columns and diagonals, l = last_q, b a query block.

Selected by `attention.impl=sparse` (qwenjax.attention); the budgets travel in the kernel name that
`spec(...)` builds (`sparse:vertical=1000,slash=6096,...`), a static string, so each budget compiles once.
Decoding steps (one query over a cache) stay dense; a chunked prefill into a cache is sparse per chunk.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.errors import UserError
from qwenjax.run_sections import check_sparse_budgets

NAME = "sparse"
F32 = jnp.float32
_GATHER_ELEMENTS = 1 << 24  # gathered key (and value) elements per query block: 64 MiB in float32

#: (query, key) pairs over every call since `reset_stats()`: selected ones, visible (causal) ones and the
#: estimate's last_q x S scores; filled by a host callback when a compiled sparse kernel runs
STATS = {"selected": 0.0, "causal": 0.0, "estimate": 0.0}


@dataclasses.dataclass(frozen=True)
class Budgets:
    """MInference's defaults (vertical 1000, slash 6096, last_q 64, 30 sink columns, 100 local diagonals)."""

    vertical: float = 1000
    slash: float = 6096
    last_q: int = 64
    sink: int = 30
    local: int = 100

    def __post_init__(self):
        check_sparse_budgets(self.vertical, self.slash, self.last_q, self.sink, self.local)

    def counts(self, S: int) -> tuple[int, int]:
        """(columns, diagonals) selected among S keys."""
        def n(budget):
            return int(budget) if budget >= 1 else max(1, math.ceil(budget * S))
        return min(S, max(n(self.vertical), self.sink)), min(S, max(n(self.slash), self.local))


def spec(budgets: Budgets) -> str:
    """The kernel name carrying `budgets`: 'sparse:vertical=1000,slash=6096,last_q=64,sink=30,local=100'."""
    return NAME + ":" + ",".join(f"{f.name}={getattr(budgets, f.name):g}" for f in dataclasses.fields(Budgets))


def parse(impl: str) -> Budgets | None:
    """The budgets of a sparse kernel name ('sparse' = the defaults), None for another kernel's name."""
    if impl != NAME and not impl.startswith(NAME + ":"):
        return None
    fields = {f.name for f in dataclasses.fields(Budgets)}
    values = {}
    for item in filter(None, impl[len(NAME) + 1:].split(",")):
        key, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if key not in fields or number is None:
            raise UserError(f"attention kernel {impl!r}: {item!r} is not KEY=NUMBER with KEY one of "
                            f"{', '.join(sorted(fields))}")
        values[key] = int(number) if number >= 1 or key in ("last_q", "sink", "local") else number
    return Budgets(**values)


def reset_stats() -> None:
    STATS.update(selected=0.0, causal=0.0, estimate=0.0)


def stats_fraction() -> dict:
    """The kept fraction over the calls since `reset_stats()` (None before any)."""
    causal = STATS["causal"]
    return {"selected_pairs": STATS["selected"], "causal_pairs": causal, "estimate_pairs": STATS["estimate"],
            "kept_fraction": STATS["selected"] / causal if causal else None,
            "kept_fraction_with_estimate": (STATS["selected"] + STATS["estimate"]) / causal if causal else None}


def _record(selected, causal, estimate) -> None:
    STATS["selected"] += float(selected)
    STATS["causal"] += float(causal)
    STATS["estimate"] += float(estimate)


def _ok(q_slot_b, key_BNbm, seg_Bb, seg_BS, window):
    """[B, N, b, m] booleans: may query slot b see key slot key[..., b, m] (in range, causal, window, segment)."""
    S = None if seg_BS is None else seg_BS.shape[1]
    ok = (key_BNbm >= 0) & (key_BNbm <= q_slot_b[:, None])
    if window is not None:
        ok = ok & (q_slot_b[:, None] - key_BNbm < window)
    if seg_Bb is not None:
        seg_k = jnp.take_along_axis(seg_BS[:, None, None, :], jnp.clip(key_BNbm, 0, S - 1), axis=-1)
        ok = ok & (seg_Bb[:, None, :, None] == seg_k)
    return ok


def _gather(x_BNSH, idx_BNbm):
    """x[b, n, idx[b, n, ...]] -> [B, N, b, m, H]."""
    B, N, b, m = idx_BNbm.shape
    flat = jnp.take_along_axis(x_BNSH, idx_BNbm.reshape(B, N, b * m, 1), axis=2)
    return flat.reshape(B, N, b, m, x_BNSH.shape[-1])


def select(q_BTNH, k_BSKH, budgets: Budgets, *, q_slot_T, segment_ids_BT=None, window=None):
    """(columns [B, N, v], diagonals [B, N, s]) int32: the vertical + slash pattern of each head (doc, 1-3)."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    nv, ns = budgets.counts(S)
    lq = min(budgets.last_q, T)
    k_BNSH = jnp.repeat(k_BSKH, N // K, axis=2).transpose(0, 2, 1, 3)
    q_BNlH = q_BTNH[:, T - lq:].transpose(0, 2, 1, 3)
    scores_BNlS = jnp.einsum("bnlh,bnsh->bnls", q_BNlH, k_BNSH, preferred_element_type=F32) * H**-0.5
    slot_l = q_slot_T[T - lq:]
    key_11lS = jnp.broadcast_to(jnp.arange(S), (1, 1, lq, S))
    seg_l = None if segment_ids_BT is None else segment_ids_BT[:, T - lq:]
    visible = _ok(slot_l, key_11lS, seg_l, segment_ids_BT, window)
    p_BNlS = jax.nn.softmax(jnp.where(visible, scores_BNlS, -jnp.inf), axis=-1)
    s_S = jnp.arange(S)
    vertical_BNS = jnp.where(s_S < budgets.sink, jnp.inf, p_BNlS.sum(axis=2))
    key_lS = slot_l[:, None] - s_S[None, :]  # the key of diagonal d (= s_S) on last query l
    on_diag = jnp.take_along_axis(p_BNlS, jnp.broadcast_to(jnp.clip(key_lS, 0, S - 1), p_BNlS.shape), axis=-1)
    slash_BNS = jnp.where(s_S < budgets.local, jnp.inf, jnp.where(key_lS >= 0, on_diag, 0.0).sum(axis=2))
    return jax.lax.top_k(vertical_BNS, nv)[1].astype(jnp.int32), jax.lax.top_k(slash_BNS, ns)[1].astype(jnp.int32)


def _sparse(q_BTNH, k_BSKH, v_BSKH, budgets: Budgets, segment_ids_BT=None, window=None, q_offset=None):
    """(out [B, T, N, H], selected pairs, visible pairs, estimate pairs) of the pattern (doc, 4)."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    q_slot_T = jnp.arange(T) if q_offset is None else q_offset + jnp.arange(T)
    vidx_BNv, didx_BNs = select(q_BTNH, k_BSKH, budgets, q_slot_T=q_slot_T, segment_ids_BT=segment_ids_BT,
                                window=window)
    nv, ns = vidx_BNv.shape[-1], didx_BNs.shape[-1]
    k_BNSH = jnp.repeat(k_BSKH, N // K, axis=2).transpose(0, 2, 1, 3)
    v_BNSH = jnp.repeat(v_BSKH, N // K, axis=2).transpose(0, 2, 1, 3)
    kv_BNvH, vv_BNvH = (jnp.take_along_axis(x, vidx_BNv[..., None], axis=2) for x in (k_BNSH, v_BNSH))
    bi, ni = jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None]
    is_column_BNS = jnp.zeros((B, N, S), bool).at[bi, ni, vidx_BNv].set(True)

    b = int(max(1, min(T, _GATHER_ELEMENTS // max(1, B * N * ns * H))))
    nb = -(-T // b)
    pad = nb * b - T
    q_pad = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    slot_pad = jnp.concatenate([q_slot_T, jnp.full((pad,), -1, q_slot_T.dtype)])  # padded queries see nothing
    seg_pad = None if segment_ids_BT is None else jnp.pad(segment_ids_BT, ((0, 0), (0, pad)))
    scale = H**-0.5

    def block(i):
        q_BbNH = jax.lax.dynamic_slice_in_dim(q_pad, i * b, b, axis=1)
        slot_b = jax.lax.dynamic_slice_in_dim(slot_pad, i * b, b)
        seg_Bb = None if seg_pad is None else jax.lax.dynamic_slice_in_dim(seg_pad, i * b, b, axis=1)
        col_BNbv = jnp.broadcast_to(vidx_BNv[:, :, None, :], (B, N, b, nv))
        ok_v = _ok(slot_b, col_BNbv, seg_Bb, segment_ids_BT, window)
        key_BNbs = slot_b[None, None, :, None] - didx_BNs[:, :, None, :]
        safe_BNbs = jnp.clip(key_BNbs, 0, S - 1)
        dup = jnp.take_along_axis(is_column_BNS, safe_BNbs.reshape(B, N, b * ns), axis=2).reshape(B, N, b, ns)
        ok_s = _ok(slot_b, key_BNbs, seg_Bb, segment_ids_BT, window) & ~dup  # a column's key counted once
        sv = jnp.einsum("bqnh,bnvh->bnqv", q_BbNH, kv_BNvH, preferred_element_type=F32) * scale
        ss = jnp.einsum("bqnh,bnqsh->bnqs", q_BbNH, _gather(k_BNSH, safe_BNbs), preferred_element_type=F32) * scale
        scores = jnp.where(jnp.concatenate([ok_v, ok_s], -1), jnp.concatenate([sv, ss], -1), -jnp.inf)
        p = jax.nn.softmax(scores, axis=-1)
        p = jnp.where(jnp.isnan(p), 0.0, p).astype(v_BSKH.dtype)  # padded queries: no key at all
        out_BNbH = (jnp.einsum("bnqv,bnvh->bnqh", p[..., :nv], vv_BNvH, preferred_element_type=F32)
                    + jnp.einsum("bnqs,bnqsh->bnqh", p[..., nv:], _gather(v_BNSH, safe_BNbs),
                                 preferred_element_type=F32))
        key_11bS = jnp.broadcast_to(jnp.arange(S), (1, 1, b, S))
        visible = _ok(slot_b, key_11bS, seg_Bb, segment_ids_BT, window)
        counts = (ok_v.sum(dtype=F32) + ok_s.sum(dtype=F32), visible.sum(dtype=F32) * (N * B / visible.shape[0]))
        return out_BNbH.astype(q_BTNH.dtype), counts

    out_nBNbH, (selected_n, causal_n) = jax.lax.map(block, jnp.arange(nb))
    out_BTNH = out_nBNbH.transpose(1, 0, 3, 2, 4).reshape(B, nb * b, N, H)[:, :T]
    estimate = float(B * N * min(budgets.last_q, T) * S)
    return out_BTNH, selected_n.sum(), causal_n.sum(), estimate


def sparse(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, window=None, q_offset=None,
           budgets: Budgets = Budgets()):
    """Vertical + slash sparse attention (module doc), with the signature of `attention.reference`; adds its
    pair counts to `STATS` when it runs."""
    out, selected, causal, estimate = _sparse(q_BTNH, k_BSKH, v_BSKH, budgets, segment_ids_BT, window, q_offset)
    jax.debug.callback(_record, selected, causal, estimate)
    return out


def kept_fraction(q_BTNH, k_BSKH, *, budgets: Budgets = Budgets(), segment_ids_BT=None, window=None,
                  q_offset=None) -> float:
    """Selected (query, key) pairs / visible (causal) pairs, over all examples and heads, for these inputs."""
    _, selected, causal, _ = _sparse(q_BTNH, k_BSKH, k_BSKH, budgets, segment_ids_BT, window, q_offset)
    return float(np.asarray(selected) / np.asarray(causal))
