"""Chat batches: conversations tokenised once (ids + assistant-only loss mask, `qwenjax.data.chat`) and packed
whole into rows, each conversation its own segment, in the one batch schema (`BATCH_DTYPES`).

`build_chat_cache(files, tokenizer, cache_root)` writes `cache_root/<key>/` once (flat ids and masks per split,
conversation offsets, each conversation's file and line), built in a temp folder and renamed into place like the
text token cache. A conversation goes to the held-out split when a hash of its JSONL line is below the held-out
fraction. Packing is next-fit in a seeded order per epoch: a conversation of L tokens fills L - 1 slots of a
`seq_len` row (inputs = ids[:-1], targets = ids[1:], loss_mask = the mask of the target token, positions from 0,
its own segment id); the rest of a row is padding (eos ids, one more segment, loss_mask 0). A conversation
longer than seq_len + 1 tokens is a UserError naming its file:line, or is cut to its first seq_len + 1 tokens
with `truncate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwenjax.data.batches import BATCH_DTYPES, Batch
from qwenjax.data.chat import encode_chat, heldout_hash, read_conversations, special_ids
from qwenjax.data.step_iterator import StepIterator
from qwenjax.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from qwenjax.errors import UserError

CHAT_CACHE_VERSION = 1
CHAT_STATE_FORMAT = "qwenjax.data.chat_iterator/1"
_SPLITS = ("train", "heldout")
_ARRAYS = ("ids", "mask", "offsets", "file", "line")


def chat_cache_key(files: Sequence[Path], tokenizer_path: str | os.PathLike, heldout_fraction: float) -> str:
    entries = [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]
    payload = {"version": CHAT_CACHE_VERSION, "files": entries, "tokenizer": tokenizer_fingerprint(tokenizer_path),
               "heldout_fraction": float(heldout_fraction)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()



class ChatCache:
    """A built chat cache: per split, conversations as (ids, mask) slices of flat arrays (memory-mapped)."""

    def __init__(self, path: str | os.PathLike, *, built: bool = False):
        self.path = Path(path)
        self.built = built
        try:
            self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
            self.vocab_size = int(self.meta["vocab_size"])
            self.eos_id = int(self.meta["eos_id"])
            self.key = str(self.meta["key"])
            self.tokenizer_fingerprint = str(self.meta["tokenizer_fingerprint"])
            self.files = list(self.meta["files"])
            self._a = {(s, n): np.load(self.path / f"{s}_{n}.npy", mmap_mode="r") for s in _SPLITS for n in _ARRAYS}
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"chat cache {self.path} is incomplete or corrupt; delete that folder") from None
        if self.meta.get("version") != CHAT_CACHE_VERSION:
            raise UserError(f"chat cache {self.path} has format {self.meta.get('version')}, expected "
                            f"{CHAT_CACHE_VERSION}; delete that folder")
        self._entropy: dict[str, float] = {}

    def num(self, split: str) -> int:
        return len(self._a[split, "offsets"]) - 1

    def lengths(self, split: str) -> np.ndarray:
        return np.diff(np.asarray(self._a[split, "offsets"], dtype=np.int64))

    def conversation(self, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = (int(x) for x in self._a[split, "offsets"][i:i + 2])
        return np.asarray(self._a[split, "ids"][lo:hi]), np.asarray(self._a[split, "mask"][lo:hi])

    def where(self, split: str, i: int) -> str:
        return f"{self.files[int(self._a[split, 'file'][i])]}:{int(self._a[split, 'line'][i])}"

    def check_lengths(self, seq_len: int, truncate: bool) -> None:
        """UserError naming the first conversation longer than seq_len + 1 tokens (unless `truncate`)."""
        if truncate:
            return
        for split in _SPLITS:
            too_long = np.flatnonzero(self.lengths(split) > seq_len + 1)
            if len(too_long):
                i = int(too_long[0])
                raise UserError(f"{self.where(split, i)}: the conversation has {int(self.lengths(split)[i])} tokens, "
                                f"more than train.seq_len + 1 = {seq_len + 1} ({len(too_long)} such in the "
                                f"{split} split); raise train.seq_len or set data.truncate: true to cut them")

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy (nats/token) of the unigram distribution of the trained (assistant) tokens of a split."""
        if split not in self._entropy:
            ids = np.asarray(self._a[split, "ids"])[np.asarray(self._a[split, "mask"]) == 1]
            if len(ids) == 0:
                raise UserError(f"the {split} split of chat cache {self.path} has no assistant tokens")
            counts = np.bincount(ids, minlength=self.vocab_size)
            p = counts[counts > 0] / counts.sum()
            self._entropy[split] = float(-(p * np.log(p)).sum())
        return self._entropy[split]

    def rows_batch(self, split: str, rows: Sequence[Sequence[int]], seq_len: int) -> Batch:
        """Pack each row's conversations (indices into `split`) into one `[len(rows), seq_len]` batch."""
        out = {k: np.zeros((len(rows), seq_len), dtype=dt) for k, dt in BATCH_DTYPES.items()}
        for r, convs in enumerate(rows):
            t = 0
            for seg, i in enumerate(convs, 1):
                ids, mask = self.conversation(split, i)
                ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
                n = len(ids) - 1
                out["inputs"][r, t:t + n] = ids[:-1]
                out["targets"][r, t:t + n] = ids[1:]
                out["loss_mask"][r, t:t + n] = mask[1:]
                out["segment_ids"][r, t:t + n] = seg
                out["positions"][r, t:t + n] = np.arange(n)
                t += n
            out["inputs"][r, t:] = self.eos_id
            out["targets"][r, t:] = self.eos_id
            out["segment_ids"][r, t:] = len(convs) + 1
            out["positions"][r, t:] = np.arange(seq_len - t)
        return Batch(**out)

    def train_iterator(self, *, seq_len: int, global_batch_size: int, seed: int, truncate: bool = False,
                       process_index: int = 0, process_count: int = 1) -> ChatTrainIterator:
        return ChatTrainIterator(self, seq_len, global_batch_size, seed, truncate, process_index, process_count)

    def eval_batches(self, *, seq_len: int, batch_size: int, num_batches: int, truncate: bool = False,
                     process_index: int = 0, process_count: int = 1) -> list[Batch]:
        """Fixed held-out batches: the held-out conversations in file order, packed, rows spread evenly (or
        cycled) over `num_batches` batches of `batch_size` (global) rows."""
        self.check_lengths(seq_len, truncate)
        if self.num("heldout") < 1:
            raise UserError(f"the chat data has no held-out conversations ({self.num('train')} in all); use more "
                            "conversations or a larger data.heldout_fraction")
        rows = pack_rows(self.lengths("heldout"), np.arange(self.num("heldout")), seq_len)
        total, local = batch_size * num_batches, batch_size // process_count
        ids = (np.arange(total) * len(rows)) // total if total <= len(rows) else np.arange(total) % len(rows)
        ids = ids.reshape(num_batches, batch_size)[:, process_index * local:(process_index + 1) * local]
        return [self.rows_batch("heldout", [rows[i] for i in b], seq_len) for b in ids]

    def __repr__(self) -> str:
        return f"ChatCache({str(self.path)!r}, train={self.num('train')}, heldout={self.num('heldout')})"


def pack_rows(lengths: np.ndarray, order: np.ndarray, seq_len: int) -> list[list[int]]:
    """Next-fit: conversations in `order`, each filling min(L, seq_len + 1) - 1 slots, into rows of seq_len."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = max(0, min(int(lengths[i]), seq_len + 1) - 1)
        if current and used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        rows.append(current)
    return rows


class ChatTrainIterator(StepIterator):
    """Packed training batches over epochs (each epoch a new seeded order), checkpointable by its step: the
    interface of `qwenjax.data.TrainIterator` (`next`, `batch_at`, `get_state`, `set_state`, `close`)."""

    STATE_FORMAT, KIND = CHAT_STATE_FORMAT, "chat"
    FINGERPRINT_OF = "conversations, tokenizer, seq_len, global batch size, seed or truncation"

    def __init__(self, cache: ChatCache, seq_len: int, global_batch_size: int, seed: int, truncate: bool,
                 process_index: int, process_count: int):
        self._start(cache, seq_len, global_batch_size, seed, truncate, process_index, process_count,
                    empty=f"the chat data {cache.files} has no training conversations")
        self._lengths = cache.lengths("train")
        self._epoch_rows: dict[int, list[list[int]]] = {}
        self._epoch_starts = [0]  # global row index where each computed epoch starts
        self.fingerprint = hashlib.sha256(json.dumps({
            "cache": cache.key, "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
            "seed": self.seed, "truncate": bool(truncate), "version": 1}, sort_keys=True).encode()).hexdigest()[:16]

    def rows_of_epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_rows:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(self.cache.num("train"))
            if len(self._epoch_rows) >= 2:
                self._epoch_rows.pop(min(self._epoch_rows))
            self._epoch_rows[epoch] = pack_rows(self._lengths, order, self.seq_len)
        return self._epoch_rows[epoch]

    def _row(self, g: int) -> list[int]:
        while self._epoch_starts[-1] <= g:
            e = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self.rows_of_epoch(e)))
        e = int(np.searchsorted(self._epoch_starts, g, side="right")) - 1
        return self.rows_of_epoch(e)[g - self._epoch_starts[e]]

    def rows_per_epoch(self) -> int:
        return len(self.rows_of_epoch(0))

    def batch_at(self, step: int) -> Batch:
        base = int(step) * self.global_batch_size + self.first
        return self.cache.rows_batch("train", [self._row(base + r) for r in range(self.local)], self.seq_len)


def build_chat_cache(files: Sequence[Path], tokenizer_path: str | os.PathLike, cache_root: str | os.PathLike, *,
                     heldout_fraction: float = 0.01) -> ChatCache:
    """Tokenise the conversations once into `cache_root/<key>/`, or reuse the cache already there."""
    files = [Path(f) for f in files]
    cache_root = Path(cache_root).expanduser()
    key = chat_cache_key(files, tokenizer_path, heldout_fraction)
    final = cache_root / key[:20]
    if final.exists():
        return ChatCache(final)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".tmp-{key[:20]}-{socket.gethostname()}-{os.getpid()}-{random.getrandbits(32):08x}"
    tmp.mkdir()
    try:
        tok = load_tokenizer(tokenizer_path)
        special_ids(tok)
        index = {str(f): k for k, f in enumerate(files)}
        convs = []
        for where, line, messages in read_conversations(files):
            f, lineno = where.rsplit(":", 1)
            ids, mask = encode_chat(tok, messages)
            convs.append((heldout_hash(line), index[f], int(lineno), ids, mask))
        if not convs:
            raise UserError(f"the chat files ({len(files)}) hold no conversations")
        held = [c[0] < heldout_fraction for c in convs]
        if heldout_fraction > 0 and len(convs) >= 2 and not any(held):
            held[int(np.argmin([c[0] for c in convs]))] = True
        dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
        counts = {}
        for split, want in (("train", False), ("heldout", True)):
            part = [c for c, h in zip(convs, held, strict=True) if h == want]
            counts[split] = len(part)
            arrays = {
                "ids": np.concatenate([c[3] for c in part]).astype(dtype) if part else np.zeros(0, dtype),
                "mask": np.concatenate([c[4] for c in part]) if part else np.zeros(0, np.uint8),
                "offsets": np.concatenate([[0], np.cumsum([len(c[3]) for c in part])]).astype(np.int64),
                "file": np.asarray([c[1] for c in part], np.int32), "line": np.asarray([c[2] for c in part], np.int32),
            }
            for name, arr in arrays.items():
                np.save(tmp / f"{split}_{name}.npy", arr)
        meta = {"version": CHAT_CACHE_VERSION, "key": key, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                "tokenizer_fingerprint": tok.fingerprint, "files": [str(f) for f in files],
                "num_conversations": counts}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / "meta.json").exists():  # another worker won the race: use theirs
                return ChatCache(final)
            raise
        return ChatCache(final, built=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
