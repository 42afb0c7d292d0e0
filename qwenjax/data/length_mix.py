"""Rows of shorter documents in a packed batch (`data.length_mix`, Qwen2.5-Turbo's 40% full / 60% short).

Every row is cut from the token stream as usual (`batches.pack_windows`). In the rows chosen as short,
each document is further cut into pieces of at most `short_len` tokens: segment ids go up and positions
restart at 0 at each piece, so attention (which never crosses segments) spans at most `short_len` tokens
there, while the loss still covers every token. Which rows are short is drawn per step from the seed and
the step alone (exactly round(short x rows) of the global batch), so every process, and a resumed run,
picks the same rows.
"""

from __future__ import annotations

import numpy as np


def short_rows(step: int, global_batch_size: int, short_share: float, seed: int) -> np.ndarray:
    """bool[global_batch_size]: which rows of global batch `step` hold short documents."""
    n_short = int(round(short_share * global_batch_size))
    salt = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x1E46, int(step)]).generate_state(1)[0])
    order = np.random.default_rng(salt).permutation(global_batch_size)
    return order < n_short


def cut_documents(batch: dict, rows: np.ndarray, short_len: int) -> dict:
    """`batch` with the documents of `rows` (bool per row) cut into pieces of at most `short_len` tokens."""
    if not rows.any():
        return batch
    pos = batch["positions"][rows]
    cut = (pos % short_len == 0) & (pos > 0)
    out = dict(batch)
    out["segment_ids"] = batch["segment_ids"].copy()
    out["positions"] = batch["positions"].copy()
    out["segment_ids"][rows] = batch["segment_ids"][rows] + np.cumsum(cut, axis=1, dtype=np.int32)
    out["positions"][rows] = pos % short_len
    return out
