"""Dual Chunk Attention (DCA; An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models"),
at inference, with the position rules of Qwen2.5-1M's serving code (vLLM's `DualChunkRotaryEmbedding` and
`DualChunkFlashAttention`), configured by HF's `dual_chunk_attention_config`.

Why: no query-key relative position may exceed what the model was trained on. The sequence is cut into chunks
of `chunk_len = chunk_size - local_size` slots. With p a query's slot and s a key's slot:

- keys are rotated at `s mod chunk_len` (the same rotation for every relation, so the KV cache holds rotated
  keys as without DCA: only the query is rotated three ways, at attention time);
- intra-chunk (s in p's chunk, s <= p): the query at `p mod chunk_len`, so distances are the plain ones;
- successive-chunk (s in the chunk before p's): the query at `min(p mod chunk_len + chunk_len, chunk_size)`;
  the distance to a key of the previous chunk stays <= chunk_size, and near the boundary (the first
  `local_size` queries) it is the true distance, so locality is kept;
- inter-chunk (s in any earlier chunk): the query at the constant `min(2 chunk_len - 1, chunk_size)`.

The three parts are one softmax over the union of the keys (each key belongs to exactly one relation for a
given query): the exact log-sum-exp merge. When `original_max_position_embeddings` is set, every score of the
query at slot p is multiplied by `max(1, 0.1 ln((p + 1) / original) + 1)`, vLLM's length temperature; vLLM
takes the length of the whole request, here it is the query's own length, so the model stays causal (a cached
decode equals a forward without cache) and the last prompt token and every decoded token see the same factor
as in vLLM.

Memory: the queries go through in blocks of `QUERY_BLOCK` rows (`lax.map`); a block holds three score
matrices over all S keys, so temporaries grow linearly in S (O(QUERY_BLOCK x S)), never T x S.
A sequence whose slots all fit in one chunk (S <= chunk_len) is plain attention: `model.Attention` then runs
its usual kernel, bit for bit the model without DCA.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qwenjax.config import ModelConfig
from qwenjax.errors import UserError
from qwenjax.rope import apply_rope, rope_cos_sin

QUERY_BLOCK = 256  # query rows per step of the block loop (temporaries ~ 3 x QUERY_BLOCK x S scores per head)


def chunk_len(config: ModelConfig) -> int:
    d = config.dca_dict
    return d["chunk_size"] - d["local_size"]


def fits_one_chunk(config: ModelConfig, num_slots: int) -> bool:
    """Whether every slot of a sequence of `num_slots` (keys, cache included) is in chunk 0: plain attention."""
    return num_slots <= chunk_len(config)


def _slots(T: int, q_offset) -> jax.Array:
    return jnp.arange(T) if q_offset is None else q_offset + jnp.arange(T)


def key_cos_sin(config: ModelConfig, B: int, T: int, q_offset, dtype):
    """cos/sin [B, T, H] that rotate the keys of slots q_offset + t at `slot mod chunk_len`."""
    positions_BT = jnp.broadcast_to(_slots(T, q_offset) % chunk_len(config), (B, T))
    return rope_cos_sin(config, positions_BT, dtype)


def query_positions(config: ModelConfig, slots_T):
    """(intra [T], successive [T], inter scalar): the RoPE positions of the three query rotations."""
    d = config.dca_dict
    C, Lc = d["chunk_size"], chunk_len(config)
    intra_T = slots_T % Lc
    return intra_T, jnp.minimum(intra_T + Lc, C), min(2 * Lc - 1, C)


def temperature(config: ModelConfig, slots_T) -> jax.Array | None:
    """The per-query score factor max(1, 0.1 ln((p + 1) / original) + 1) [T] (None without `original`)."""
    original = config.dca_dict.get("original_max_position_embeddings")
    if not original:
        return None
    return jnp.maximum(1.0, 0.1 * jnp.log((slots_T + 1).astype(jnp.float32) / original) + 1.0)


def _rotate(config, q_BTNH, positions_T):
    B, T = q_BTNH.shape[:2]
    cos_BTH, sin_BTH = rope_cos_sin(config, jnp.broadcast_to(positions_T, (B, T)), q_BTNH.dtype)
    return apply_rope(q_BTNH, cos_BTH, sin_BTH)


def _block(Lc: int, q3_3BtNH, slots_t, k_BSKH, v_BSKH):
    """Attention of one block of queries (rotated three ways) over all S keys, one softmax over the union."""
    _, B, t, N, H = q3_3BtNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    s_S = jnp.arange(S)
    chunk_q_t1, chunk_k_1S = (slots_t // Lc)[:, None], (s_S // Lc)[None, :]
    causal_tS = s_S[None, :] <= slots_t[:, None]
    intra_tS = (chunk_k_1S == chunk_q_t1) & causal_tS
    succ_tS = chunk_k_1S == chunk_q_t1 - 1

    def scores(q_BtNH):
        s_BKRtS = jnp.einsum("btkrh,bskh->bkrts", q_BtNH.reshape(B, t, K, N // K, H), k_BSKH)
        return (s_BKRtS.astype(jnp.float32) * H**-0.5).astype(q_BtNH.dtype)  # as attention._attend_block

    s_BKRtS = jnp.where(intra_tS, scores(q3_3BtNH[0]), jnp.where(succ_tS, scores(q3_3BtNH[1]),
                                                                  scores(q3_3BtNH[2])))
    s_BKRtS = jnp.where(causal_tS, s_BKRtS, jnp.finfo(s_BKRtS.dtype).min)
    probs_BKRtS = jax.nn.softmax(s_BKRtS.astype(jnp.float32), axis=-1).astype(q3_3BtNH.dtype)
    return jnp.einsum("bkrts,bskh->btkrh", probs_BKRtS, v_BSKH).reshape(B, t, N, H)


def attend(config: ModelConfig, q_BTNH, k_BSKH, v_BSKH, *, q_offset=None, segment_ids_BT=None,
           query_block: int = QUERY_BLOCK) -> jax.Array:
    """DCA over keys already rotated at `slot mod chunk_len` (`key_cos_sin`); `q_BTNH` NOT rotated.

    q_offset: the slot of query 0 over a KV cache of S slots (keys at slots > the query's are masked);
    None: self-attention, S == T. Returns [B, T, N, H].
    """
    if segment_ids_BT is not None:
        raise UserError("dual chunk attention runs at inference, one sequence per row: packed segments are not "
                        "supported (set model.dual_chunk_attention_config=null to train)")
    B, T, N, H = q_BTNH.shape
    Lc = chunk_len(config)
    slots_T = _slots(T, q_offset)
    intra_T, succ_T, inter = query_positions(config, slots_T)
    scale_T = temperature(config, slots_T)
    if scale_T is not None:
        q_BTNH = (q_BTNH.astype(jnp.float32) * scale_T[None, :, None, None]).astype(q_BTNH.dtype)
    q3_3BTNH = jnp.stack([_rotate(config, q_BTNH, intra_T), _rotate(config, q_BTNH, succ_T),
                          _rotate(config, q_BTNH, jnp.full((T,), inter))])
    if T <= query_block:
        return _block(Lc, q3_3BTNH, slots_T, k_BSKH, v_BSKH)
    n = math.ceil(T / query_block)
    pad = n * query_block - T  # padded query rows see every key and are dropped
    q3_3BTNH = jnp.pad(q3_3BTNH, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
    slots_T = jnp.pad(slots_T, (0, pad), constant_values=jnp.iinfo(jnp.int32).max // 2)
    q3_n3BtNH = q3_3BTNH.reshape(3, B, n, query_block, N, H).transpose(2, 0, 1, 3, 4, 5)
    out_nBtNH = jax.lax.map(lambda xs: _block(Lc, xs[0], xs[1], k_BSKH, v_BSKH),
                            (q3_n3BtNH, slots_T.reshape(n, query_block)))
    return out_nBtNH.transpose(1, 0, 2, 3, 4).reshape(B, n * query_block, N, H)[:, :T]
