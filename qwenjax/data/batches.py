"""Batches: the one batch schema, packing, and the checkpointable training and fixed eval iterators.

`make_train_iterator(caches, weights, ...)` cuts each cache's train split into windows of
`seq_len + 1` tokens, shuffles them by seed, repeats them over epochs, mixes sources by weight (grain)
and packs them with `pack_windows`; each process takes its own rows of every global batch.
`get_state()`/`set_state()` make it checkpointable (JSON-serialisable dicts). `make_eval_batches(cache,
...)` returns fixed held-out batches packed the same way, so both follow `BATCH_DTYPES`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from qwenjax.data.cache import TokenCache
from qwenjax.data.length_mix import cut_documents, short_rows
from qwenjax.errors import UserError

STATE_FORMAT = "qwenjax.data.train_iterator/1"

#: The batch schema of training and eval batches (and of synthetic benchmark batches). Every array is
#: `[rows, seq_len]`; loss_mask is float32 so that it weights the per-token loss directly.
BATCH_DTYPES: dict[str, np.dtype] = {
    "inputs": np.dtype(np.int32),
    "targets": np.dtype(np.int32),
    "segment_ids": np.dtype(np.int32),
    "positions": np.dtype(np.int32),
    "loss_mask": np.dtype(np.float32),
}
BATCH_KEYS = tuple(BATCH_DTYPES)


class Batch(TypedDict):
    """One batch, `[rows, seq_len]` each (see `pack_windows` for how the fields are derived)."""

    inputs: np.ndarray  # token ids
    targets: np.ndarray  # the next token of each input
    segment_ids: np.ndarray  # the document of each token within its row, from 1
    positions: np.ndarray  # the position of each token within its document, from 0
    loss_mask: np.ndarray  # 0.0 where the input is eos (its target starts the next document), else 1.0


def batch_shapes(rows: int, seq_len: int) -> dict[str, tuple[tuple[int, int], np.dtype]]:
    """(shape, dtype) of every batch field: what a compiled step is traced with."""
    return {k: ((int(rows), int(seq_len)), dt) for k, dt in BATCH_DTYPES.items()}


def check_batch(batch: Mapping[str, Any], rows: int | None = None, seq_len: int | None = None) -> None:
    """Raise ValueError unless `batch` follows the schema (keys, dtypes, one `[rows, seq_len]` shape)."""
    if set(batch) != set(BATCH_KEYS):
        raise ValueError(f"batch keys {sorted(batch)} are not the schema's {sorted(BATCH_KEYS)}")
    shape = np.shape(batch["inputs"])
    want = (shape[0] if rows is None else int(rows), shape[-1] if seq_len is None else int(seq_len))
    for k, (expected, dtype) in batch_shapes(*want).items():
        v = batch[k]
        if tuple(np.shape(v)) != expected or np.dtype(v.dtype) != dtype:
            raise ValueError(f"batch[{k!r}] is {np.dtype(v.dtype).name}{list(np.shape(v))}, "
                             f"expected {dtype.name}{list(expected)}")


def pack_windows(windows: np.ndarray, eos_id: int | None) -> Batch:
    """`[rows, seq_len + 1]` token windows -> a `Batch`: every training and eval batch is made here.

    inputs = w[:, :-1], targets = w[:, 1:]; segment_ids start at 1 in each row and go up by one
    after each eos in `inputs`; positions restart at 0 at the row start and after each eos;
    loss_mask is 0 where the input is eos (its target starts the next document), else 1.
    `eos_id=None` makes each row one document (synthetic benchmark batches).
    """
    w = np.asarray(windows)
    inputs = w[:, :-1].astype(np.int32)
    targets = w[:, 1:].astype(np.int32)
    is_eos = np.zeros(inputs.shape, dtype=bool) if eos_id is None else inputs == eos_id
    n_before = np.cumsum(is_eos, axis=1, dtype=np.int32) - is_eos  # eos strictly before t
    segment_ids = (1 + n_before).astype(np.int32)
    seq_len = inputs.shape[1]
    idx = np.broadcast_to(np.arange(seq_len, dtype=np.int32), inputs.shape)
    starts = np.zeros(inputs.shape, dtype=np.int32)
    starts[:, 1:] = np.where(is_eos[:, :-1], idx[:, 1:], 0)
    positions = (idx - np.maximum.accumulate(starts, axis=1)).astype(np.int32)
    loss_mask = (~is_eos).astype(np.float32)
    fields = {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions,
              "loss_mask": loss_mask}
    return Batch(**{k: fields[k].astype(dtype, copy=False) for k, dtype in BATCH_DTYPES.items()})


def _gather(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> np.ndarray:
    starts = np.asarray(window_ids, dtype=np.int64) * seq_len
    return tokens[starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]]


def _check_shard(batch_size: int, process_index: int, process_count: int, what: str) -> int:
    if batch_size < 1:
        raise UserError(f"{what} must be >= 1, got {batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise UserError(f"{what} {batch_size} is not divisible by the number of processes {process_count}")
    return batch_size // process_count


def _derive_seed(seed: int, *salt: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *salt]).generate_state(1)[0])


class _BatchFn:
    """Global batch index -> this process's rows, packed."""

    def __init__(self, mixed, caches, eos_id, seq_len, global_batch_size, process_index, local_batch,
                 length_mix=None, seed=0):
        self.length_mix, self.seed = length_mix, seed  # (short share, short_len) or None
        self.mixed = mixed
        self.tokens = [c.train_tokens for c in caches]
        self.eos_id = eos_id
        self.seq_len = seq_len
        self.first = process_index * local_batch
        self.global_batch_size = global_batch_size
        self.local_batch = local_batch

    def __call__(self, step: int) -> Batch:
        base = int(step) * self.global_batch_size + self.first
        picks = [self.mixed[base + r] for r in range(self.local_batch)]
        src = np.fromiter((s for s, _ in picks), dtype=np.int64, count=len(picks))
        win = np.fromiter((w for _, w in picks), dtype=np.int64, count=len(picks))
        dtype = self.tokens[0].dtype
        windows = np.empty((self.local_batch, self.seq_len + 1), dtype=dtype)
        for s in np.unique(src):
            rows = src == s
            windows[rows] = _gather(self.tokens[s], win[rows], self.seq_len)
        batch = pack_windows(windows, self.eos_id)
        if self.length_mix is not None:
            short = short_rows(step, self.global_batch_size, self.length_mix[0], self.seed)
            batch = cut_documents(batch, short[self.first:self.first + self.local_batch], self.length_mix[1])
        return batch


class _Tag:
    def __init__(self, source: int):
        self.source = source

    def __call__(self, window: int) -> tuple[int, int]:
        return self.source, int(window)


class TrainIterator:
    """Infinite iterator of packed training batches (this process's shard of each global batch).

    A thin wrapper around a grain `DatasetIterator` (prefetching in a background thread).
    `get_state()` returns a JSON-serialisable dict; `set_state(state)` (on this or a fresh iterator
    made with the same caches, weights, seq_len, global_batch_size and seed) resumes exactly there.
    The state does not depend on process_index/process_count, so a run can resume on another
    process layout. `batch_at(step)` returns the batch of a given step directly.
    """

    def __init__(self, batches, fingerprint: str, prefetch: int):
        import grain  # local: grain imports JAX (about 0.5 s); `import qwenjax.data` stays JAX-free

        self.dataset = batches  # grain.MapDataset: step -> batch
        self.fingerprint = fingerprint
        self._read_options = grain.ReadOptions(num_threads=1 if prefetch > 0 else 0,
                                               prefetch_buffer_size=max(0, int(prefetch)))
        self._it = iter(batches.to_iter_dataset(self._read_options))

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    def batch_at(self, step: int) -> Batch:
        return self.dataset[int(step)]

    def get_state(self) -> dict[str, Any]:
        inner = self._it.get_state()
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint,
                "step": int(inner.get("next_index", 0)), "grain": _jsonable(inner)}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError("not a data-iterator state (expected the dict from TrainIterator.get_state())")
        if state.get("fingerprint") != self.fingerprint:
            raise UserError("the data-iterator state was saved for a different data configuration "
                            "(corpus, tokenizer, weights, seq_len, global batch size or seed changed)")
        self._it.set_state(state["grain"])

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def make_train_iterator(
    caches: TokenCache | Sequence[TokenCache],
    weights: Sequence[float] | None = None,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    length_mix: tuple[float, int] | None = None,
) -> TrainIterator:
    """Shuffled, repeated, weight-mixed, packed training batches for this process.

    Each batch is a `Batch` of `[global_batch_size // process_count, seq_len]` arrays (int32;
    `loss_mask` float32); process i gets rows `[i*b, (i+1)*b)` of every global batch.
    `length_mix` = (short share, short_len): that share of rows has its documents cut into pieces of at
    most short_len tokens (`qwenjax.data.length_mix`).
    """
    import grain  # local: grain imports JAX (about 0.5 s); `import qwenjax.data` stays JAX-free

    if isinstance(caches, TokenCache):
        caches = [caches]
    caches = list(caches)
    if not caches:
        raise UserError("no data sources given")
    if weights is None:
        weights = [1.0] * len(caches)
    weights = [float(w) for w in weights]
    if len(weights) != len(caches):
        raise UserError(f"{len(weights)} mixing weights for {len(caches)} data sources")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w <= 0:
            raise UserError(f"data source {i} has weight {w}; weights must be positive "
                            "(drop the source instead)")
    seq_len = int(seq_len)
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    global_batch_size = int(global_batch_size)
    local = _check_shard(global_batch_size, int(process_index), int(process_count), "global_batch_size")
    if len({c.tokenizer_fingerprint for c in caches}) > 1:
        raise UserError("the data sources were tokenised with different tokenizers")
    sources = []
    for i, c in enumerate(caches):
        n = c.num_windows(seq_len, "train")
        if n < 1:
            raise UserError(f"seq_len {seq_len} is too long for data source {i}: its train split has "
                            f"{len(c.train_tokens)} tokens, fewer than one window of {seq_len + 1}")
        ds = grain.MapDataset.range(n).shuffle(seed=_derive_seed(seed, i)).repeat(None).map(_Tag(i))
        sources.append(ds)
    mixed = sources[0] if len(sources) == 1 else grain.MapDataset.mix(sources, weights)
    if length_mix is not None and not length_mix[0]:
        length_mix = None  # no short rows: the usual packing
    batch_fn = _BatchFn(mixed, caches, caches[0].eos_id, seq_len, global_batch_size, int(process_index),
                        local, length_mix, int(seed))
    batches = grain.MapDataset.range(len(mixed) // global_batch_size).map(batch_fn)
    fp = hashlib.sha256(json.dumps({
        "caches": [c.key for c in caches], "weights": weights, "seq_len": seq_len,
        "global_batch_size": global_batch_size, "seed": int(seed), "version": 1,
        **({"length_mix": list(length_mix)} if length_mix is not None else {}),
    }, sort_keys=True).encode()).hexdigest()[:16]
    return TrainIterator(batches, fp, prefetch)


def make_eval_batches(
    cache: TokenCache,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[Batch]:
    """Fixed held-out batches (same format as training; `batch_size` is global).

    Windows are spread evenly over the held-out split (cycled if it holds fewer than needed), so
    every call returns the same batches.
    """
    seq_len = int(seq_len)
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    if int(num_batches) < 1:
        raise UserError(f"num_batches must be >= 1, got {num_batches}")
    local = _check_shard(int(batch_size), int(process_index), int(process_count), "eval batch_size")
    n = cache.num_windows(seq_len, "heldout")
    if n < 1:
        raise UserError(f"seq_len {seq_len} is too long for the held-out split of {cache.path}: it has "
                        f"{len(cache.heldout_tokens)} tokens "
                        f"({cache.meta['num_docs']['heldout']} documents), "
                        f"fewer than one window of {seq_len + 1}; use more data or a larger heldout fraction")
    total = int(batch_size) * int(num_batches)
    if total <= n:
        ids = (np.arange(total, dtype=np.int64) * n) // total
    else:
        ids = np.arange(total, dtype=np.int64) % n
    ids = ids.reshape(int(num_batches), int(batch_size))[:, process_index * local:(process_index + 1) * local]
    toks = cache.heldout_tokens
    return [pack_windows(_gather(toks, row, seq_len), cache.eos_id) for row in ids]
