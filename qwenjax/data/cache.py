"""The token cache: a corpus tokenised ONCE into flat arrays that every run of a sweep reuses.

`build_token_cache(files, tokenizer, cache_root)` writes `cache_root/<key>/{train,heldout}.npy` (flat
uint16/uint32 ids, each document followed by eos) and `meta.json`; the key hashes the file list
(sizes, mtimes), the tokenizer content, the held-out fraction and `max_bytes`. The cache is built in a
temp folder and renamed into place, so concurrent builders are safe and a killed build leaves no
partial cache. `TokenCache` reads one back (memory-mapped).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from qwenjax.data.corpus import iter_documents, resolve_files
from qwenjax.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from qwenjax.errors import UserError

CACHE_VERSION = 1
_ENCODE_CHUNK_CHARS = 4_000_000  # documents are sent to the tokenizer in batches of about this size


def _as_file_list(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        return resolve_files(files)
    out = [Path(f).expanduser() for f in files]
    if not out:
        raise UserError("the corpus is empty (no files given)")
    for f in out:
        if not f.is_file():
            raise UserError(f"corpus file {f} does not exist")
    return out


def cache_key(files: Sequence[str | os.PathLike], tokenizer_path: str | os.PathLike,
              heldout_fraction: float = 0.01, max_bytes: int | None = None) -> str:
    """The content key of a token cache (hex sha256)."""
    entries = []
    for f in files:
        st = Path(f).stat()
        entries.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    payload = {
        "version": CACHE_VERSION,
        "files": entries,
        "tokenizer": tokenizer_fingerprint(tokenizer_path),
        "heldout_fraction": float(heldout_fraction),
        "max_bytes": None if max_bytes is None else int(max_bytes),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _doc_hash(key: str) -> float:
    """A uniform number in [0, 1) from a document key (decides its split)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") / 2.0**64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


class TokenCache:
    """A built token cache: flat `train`/`heldout` token arrays (memory-mapped) + metadata."""

    def __init__(self, path: str | os.PathLike, *, built: bool = False):
        self.path = Path(path)
        self.built = built  # True when this process tokenised it (False: reused from disk)
        meta_file = self.path / "meta.json"
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        except FileNotFoundError:
            raise UserError(f"token cache {self.path} is incomplete (no meta.json); "
                            "delete that folder") from None
        except (OSError, ValueError):
            raise UserError(f"token cache {self.path} has an unreadable meta.json; "
                            "delete that folder") from None
        if self.meta.get("version") != CACHE_VERSION:
            raise UserError(f"token cache {self.path} has format {self.meta.get('version')}, "
                            f"expected {CACHE_VERSION}; delete that folder")
        self._arrays: dict[str, np.ndarray] = {}
        for split in ("train", "heldout"):
            f = self.path / f"{split}.npy"
            try:
                arr = np.load(f, mmap_mode="r")
            except (OSError, ValueError):
                raise UserError(f"token cache {self.path} has a missing or corrupt {split}.npy; "
                                "delete that folder") from None
            if arr.ndim != 1 or arr.shape[0] != self.meta["num_tokens"][split]:
                raise UserError(f"token cache {self.path}: {split}.npy does not match meta.json; "
                                "delete that folder")
            self._arrays[split] = arr
        self._entropy: dict[str, float] = {}
        try:
            self.vocab_size = int(self.meta["vocab_size"])
            self.eos_id = int(self.meta["eos_id"])
            self.key = str(self.meta["key"])
            self.tokenizer_fingerprint = str(self.meta["tokenizer_fingerprint"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"token cache {self.path} has an incomplete meta.json; delete that folder") from None

    @property
    def train_tokens(self) -> np.ndarray:
        return self._arrays["train"]

    @property
    def heldout_tokens(self) -> np.ndarray:
        return self._arrays["heldout"]

    def tokens(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            raise UserError(f"unknown split {split!r}; expected 'train' or 'heldout'")
        return self._arrays[split]

    def num_windows(self, seq_len: int, split: str = "train") -> int:
        """How many `seq_len + 1`-token windows (stride `seq_len`) the split holds."""
        return max(0, (len(self.tokens(split)) - 1) // int(seq_len))

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy (nats/token) of the split's unigram token distribution: the loss of a model
        that ignores context, so a trained model should get well below it."""
        if split not in self._entropy:
            toks = self.tokens(split)
            if len(toks) == 0:
                raise UserError(f"the {split} split of token cache {self.path} is empty")
            counts = np.zeros(self.vocab_size, dtype=np.int64)
            step = 1 << 24
            for i in range(0, len(toks), step):
                chunk = np.asarray(toks[i:i + step])
                counts += np.bincount(chunk, minlength=self.vocab_size)[: self.vocab_size]
            p = counts[counts > 0] / counts.sum()
            self._entropy[split] = float(-(p * np.log(p)).sum())
        return self._entropy[split]

    def __repr__(self) -> str:
        n = self.meta["num_tokens"]
        return (f"TokenCache({str(self.path)!r}, train={n['train']}, heldout={n['heldout']}, "
                f"vocab={self.vocab_size})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temps(cache_root: Path, short: str) -> None:
    """Delete temp folders of builds of this key killed on this host (their pid is gone)."""
    host = socket.gethostname()
    for d in cache_root.glob(f".tmp-{short}-*"):
        parts = d.name.split("-")
        try:
            d_host, d_pid = "-".join(parts[2:-2]), int(parts[-2])
        except (ValueError, IndexError):
            continue
        if d_host == host and d_pid != os.getpid() and not _pid_alive(d_pid):
            shutil.rmtree(d, ignore_errors=True)


def build_token_cache(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer_path: str | os.PathLike,
    cache_root: str | os.PathLike,
    *,
    heldout_fraction: float = 0.01,
    max_bytes: int | None = None,
) -> TokenCache:
    """Tokenise the corpus once into `cache_root/<key>/`, or reuse the cache already there.

    Each document's ids are followed by the tokenizer's eos id. Documents go to the held-out split
    with probability `heldout_fraction`, decided by a hash of their key (path relative to the corpus
    root + index), so the split is deterministic and eval never sees training documents; with two or
    more documents and a positive fraction, both splits get at least one document.
    """
    file_list = _as_file_list(files)
    heldout_fraction = float(heldout_fraction)
    if not 0.0 <= heldout_fraction < 1.0:
        raise UserError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if max_bytes is not None and int(max_bytes) <= 0:
        raise UserError(f"max_bytes must be positive, got {max_bytes}")
    cache_root = Path(cache_root).expanduser()
    key = cache_key(file_list, tokenizer_path, heldout_fraction, max_bytes)
    short = key[:20]
    final = cache_root / short
    if final.exists():
        return TokenCache(final)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache folder {cache_root}: {e.strerror or e}") from None
    _remove_stale_temps(cache_root, short)
    tmp = cache_root / f".tmp-{short}-{socket.gethostname()}-{os.getpid()}-{random.getrandbits(32):08x}"
    tmp.mkdir()
    try:
        tok = load_tokenizer(tokenizer_path)
        meta = _tokenize_into(tmp, file_list, tok, heldout_fraction, max_bytes)
        meta.update(key=key, tokenizer=str(Path(tokenizer_path).expanduser().resolve()))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / "meta.json").exists():  # another worker won the race: use theirs
                return TokenCache(final)
            raise
        return TokenCache(final, built=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _tokenize_into(out: Path, files: list[Path], tok, heldout_fraction: float,
                   max_bytes: int | None) -> dict[str, Any]:
    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    docs: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    hashes: dict[str, list[float]] = {"train": [], "heldout": []}
    progress = None
    if sys.stderr.isatty():
        progress = tqdm(total=max_bytes or sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                        desc="tokenizing", leave=False)
    t0 = time.time()
    n_bytes = 0

    def flush(batch: list[tuple[str, str]]) -> None:
        nonlocal n_bytes
        for (k, text), ids in zip(batch, tok.encode_batch([t for _, t in batch]), strict=True):
            h = _doc_hash(k)
            split = "heldout" if h < heldout_fraction else "train"
            docs[split].append(np.concatenate([np.asarray(ids, dtype=dtype), eos]))
            hashes[split].append(h)
            b = len(text.encode("utf-8", "replace"))
            n_bytes += b
            if progress is not None:
                progress.update(b)

    batch: list[tuple[str, str]] = []
    chars = 0
    try:
        for k, text in iter_documents(files, max_bytes=max_bytes):
            batch.append((k, text))
            chars += len(text)
            if chars >= _ENCODE_CHUNK_CHARS:
                flush(batch)
                batch, chars = [], 0
        flush(batch)
    finally:
        if progress is not None:
            progress.close()
    seconds = time.time() - t0
    n_docs = len(docs["train"]) + len(docs["heldout"])
    if n_docs == 0:
        raise UserError(f"the corpus ({len(files)} files) holds no non-empty documents")
    # Both splits non-empty when possible: move the extreme-hash document across.
    if heldout_fraction > 0 and not docs["heldout"] and len(docs["train"]) >= 2:
        i = int(np.argmin(hashes["train"]))
        docs["heldout"].append(docs["train"].pop(i))
        hashes["heldout"].append(hashes["train"].pop(i))
    if not docs["train"] and len(docs["heldout"]) >= 2:
        i = int(np.argmax(hashes["heldout"]))
        docs["train"].append(docs["heldout"].pop(i))
        hashes["train"].append(hashes["heldout"].pop(i))
    counts = {}
    for split in ("train", "heldout"):
        arr = np.concatenate(docs[split]) if docs[split] else np.zeros(0, dtype=dtype)
        np.save(out / f"{split}.npy", arr)
        counts[split] = int(arr.shape[0])
        docs[split].clear()
    total = counts["train"] + counts["heldout"]
    return {
        "version": CACHE_VERSION,
        "vocab_size": int(tok.vocab_size),
        "eos_id": int(tok.eos_id),
        "dtype": dtype.name,
        "tokenizer_fingerprint": tok.fingerprint,
        "heldout_fraction": heldout_fraction,
        "max_bytes": max_bytes,
        "num_tokens": counts,
        "num_docs": {s: len(hashes[s]) for s in ("train", "heldout")},
        "num_bytes": n_bytes,
        "num_files": len(files),
        "files": [str(f) for f in files],
        "tokenize_seconds": round(seconds, 3),
        "tokens_per_second": round(total / seconds, 1) if seconds > 0 else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
