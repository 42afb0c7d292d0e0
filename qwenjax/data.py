"""Corpus -> token cache -> packed, shuffled, sharded, checkpointable training batches.

Pipeline (see docs/data.md):

1. `resolve_files(path)`: a file, a glob or a folder (recursive) -> text/JSONL/JSON/Parquet files.
2. `iter_documents(files)`: a text file is one document; JSONL/JSON -> the `text` field of each
   record; Parquet -> the `text` column.
3. `build_token_cache(files, tokenizer, cache_root)`: tokenise ONCE into
   `cache_root/<key>/{train,heldout}.npy` (flat uint16/uint32 ids, each document followed by eos) +
   `meta.json`; the key hashes the file list (sizes, mtimes), the tokenizer content, the held-out
   fraction and `max_bytes`, so every run of a sweep reuses the same cache. Built in a temp folder
   and renamed into place: concurrent builders are safe and a killed build leaves no partial cache.
4. `make_train_iterator(caches, weights, ...)`: windows of `seq_len + 1` tokens, shuffled by seed,
   repeated over epochs, mixed by weight (grain), packed into
   `inputs/targets/segment_ids/positions/loss_mask`, each process taking its own rows of every
   global batch. `get_state()`/`set_state()` make it checkpointable (JSON-serialisable dicts).
5. `make_eval_batches(cache, ...)`: fixed held-out batches.

Importing this module does not import JAX (grain, which does, is imported on first use).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwenjax.errors import UserError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
CACHE_VERSION = 1
STATE_FORMAT = "qwenjax.data.train_iterator/1"
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

_SNIFF_BYTES = 8192
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
_ENCODE_CHUNK_CHARS = 4_000_000  # documents are sent to the tokenizer in batches of about this size


# --------------------------------------------------------------------------------------------
# Files and documents
# --------------------------------------------------------------------------------------------


def is_binary_file(path: str | os.PathLike) -> bool:
    """True when the first few KB hold a NUL byte or are not valid UTF-8."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError:
        return True
    if b"\0" in head:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return True
    return False


def _walk(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def _keep_readable(candidates: list[Path], what: str) -> list[Path]:
    if not candidates:
        raise UserError(f"{what} holds no files")
    kept = [f for f in candidates if f.suffix.lower() == ".parquet" or not is_binary_file(f)]
    skipped = len(candidates) - len(kept)
    if not kept:
        raise UserError(f"{what} holds only binary files ({skipped}); expected text, .jsonl or .parquet")
    if skipped:
        log.warning("skipped %d binary file(s) in %s", skipped, what)
    return kept


def resolve_files(path: str | os.PathLike) -> list[Path]:
    """A file, a glob or a folder (searched recursively) -> the sorted list of corpus files.

    Text files of any suffix are accepted (`.txt .md .py .rst ...`), plus `.jsonl`/`.json` records
    and `.parquet` tables. Binary files (NUL bytes or invalid UTF-8 in the first 8 KB) are skipped
    with a warning; hidden files/folders and `__pycache__`/`site-packages` are ignored.
    """
    s = os.fspath(path)
    if not s.strip():
        raise UserError("empty corpus path")
    p = Path(s).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".parquet" and is_binary_file(p):
            raise UserError(f"corpus file {p} is binary, not text (expected text, .jsonl or .parquet)")
        return [p]
    if p.is_dir():
        return _keep_readable(_walk(p), f"corpus folder {p}")
    if any(c in s for c in "*?["):
        found: list[Path] = []
        for m in sorted(glob.glob(os.path.expanduser(s), recursive=True)):
            mp = Path(m)
            if mp.is_dir():
                found.extend(_walk(mp))
            elif mp.is_file() and not any(part.startswith(".") for part in mp.parts[-1:]):
                found.append(mp)
        found = list(dict.fromkeys(found))
        if not found:
            raise UserError(f"no files match the corpus pattern {s!r}")
        return _keep_readable(found, f"corpus pattern {s!r}")
    raise UserError(f"corpus path {p} does not exist")


def stdlib_corpus() -> Path:
    """The running interpreter's standard-library folder (the demo's default code corpus)."""
    p = Path(sysconfig.get_paths()["stdlib"])
    if not p.is_dir():
        raise UserError(f"the Python standard library folder {p} does not exist; pass --data PATH")
    return p


def default_corpus_files(max_bytes: int | None = None, *, include_tests: bool = True) -> list[Path]:
    """The stdlib's `*.py` files (sorted; `site-packages` excluded): about 30 MB of real code.

    `include_tests=False` drops the `test`/`tests` suites (about 12 MB left). With `max_bytes`,
    files are taken in order until their total size reaches it.
    """
    root = stdlib_corpus()
    skip = set(_SKIP_DIRS)
    if not include_tests:
        skip |= {"test", "tests", "idle_test"}
    out: list[Path] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            fp = Path(dirpath) / f
            try:
                size = fp.stat().st_size
            except OSError:
                continue
            if size == 0:
                continue
            out.append(fp)
            total += size
            if max_bytes is not None and total >= max_bytes:
                return out
    if not out:
        raise UserError(f"no *.py files under {root}; pass --data PATH")
    return out


def _record_text(rec: Any, where: str) -> str | None:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        if "text" not in rec:
            raise UserError(f"{where}: record has no 'text' field (keys: {', '.join(map(str, rec))[:80]})")
        t = rec["text"]
        if t is None:
            return None
        if not isinstance(t, str):
            raise UserError(f"{where}: 'text' is {type(t).__name__}, not a string")
        return t
    raise UserError(f"{where}: expected an object with a 'text' field, got {type(rec).__name__}")


def _read_json_records(f: Path) -> Iterator[str]:
    if f.suffix.lower() == ".json":  # a JSON array of records, one record, or JSONL content
        raw = f.read_text(encoding="utf-8", errors="replace")
        try:
            whole = json.loads(raw)
        except ValueError:
            whole = None
            if raw.lstrip().startswith("[") or "\n" not in raw.strip():
                raise UserError(f"{f}: invalid JSON") from None
        if isinstance(whole, list):
            for i, rec in enumerate(whole):
                t = _record_text(rec, f"{f} item {i}")
                if t:
                    yield t
            return
        if whole is not None:
            t = _record_text(whole, str(f))
            if t:
                yield t
            return
    with open(f, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise UserError(f"{f} line {lineno}: invalid JSON ({e})") from None
            t = _record_text(rec, f"{f} line {lineno}")
            if t:
                yield t


def _read_parquet(f: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {f} needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        raise UserError(f"{f} is not a readable Parquet file ({type(e).__name__})") from None
    if "text" not in pf.schema_arrow.names:
        names = ", ".join(pf.schema_arrow.names)
        raise UserError(f"{f}: Parquet file has no 'text' column (columns: {names})")
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        for t in batch.column(0).to_pylist():
            if t is not None and not isinstance(t, str):
                raise UserError(f"{f}: 'text' column holds {type(t).__name__}, not strings")
            if t:
                yield t


def iter_file_documents(f: str | os.PathLike) -> Iterator[str]:
    """The documents of one file (see module doc)."""
    f = Path(f)
    suffix = f.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _read_json_records(f)
    elif suffix == ".parquet":
        yield from _read_parquet(f)
    else:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UserError(f"cannot read corpus file {f}: {e.strerror or e}") from None
        if text:
            yield text


def _common_root(files: Sequence[Path]) -> Path:
    parents = [str(Path(f).resolve().parent) for f in files]
    try:
        return Path(os.path.commonpath(parents))
    except ValueError:  # different drives
        return Path("/")


def iter_documents(files: Sequence[str | os.PathLike], *, max_bytes: int | None = None
                   ) -> Iterator[tuple[str, str]]:
    """(key, text) for every non-empty document; key = `<path relative to the corpus root>#<index>`.

    With `max_bytes`, stops once the UTF-8 size of the documents read reaches it.
    """
    files = [Path(f) for f in files]
    if not files:
        return
    root = _common_root(files)
    total = 0
    for f in files:
        try:
            rel = Path(f).resolve().relative_to(root).as_posix()
        except ValueError:
            rel = Path(f).resolve().as_posix()
        for i, text in enumerate(iter_file_documents(f)):
            yield f"{rel}#{i}", text
            if max_bytes is not None:
                total += len(text.encode("utf-8", "replace"))
                if total >= max_bytes:
                    return


# --------------------------------------------------------------------------------------------
# Token cache
# --------------------------------------------------------------------------------------------


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
    from qwenjax.tokenizer import tokenizer_fingerprint

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

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.meta["tokenizer_fingerprint"])

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
    from qwenjax.tokenizer import load_tokenizer

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
        from tqdm import tqdm

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


# --------------------------------------------------------------------------------------------
# Packing and batches
# --------------------------------------------------------------------------------------------


def pack_windows(windows: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """`[rows, seq_len + 1]` token windows -> the batch dict.

    inputs = w[:, :-1], targets = w[:, 1:]; segment_ids start at 1 in each row and go up by one
    after each eos in `inputs`; positions restart at 0 at the row start and after each eos;
    loss_mask is 0 where the input is eos (its target starts the next document), else 1.
    """
    w = np.asarray(windows)
    inputs = w[:, :-1].astype(np.int32)
    targets = w[:, 1:].astype(np.int32)
    is_eos = inputs == eos_id
    n_before = np.cumsum(is_eos, axis=1, dtype=np.int32) - is_eos  # eos strictly before t
    segment_ids = (1 + n_before).astype(np.int32)
    seq_len = inputs.shape[1]
    idx = np.broadcast_to(np.arange(seq_len, dtype=np.int32), inputs.shape)
    starts = np.zeros(inputs.shape, dtype=np.int32)
    starts[:, 1:] = np.where(is_eos[:, :-1], idx[:, 1:], 0)
    positions = (idx - np.maximum.accumulate(starts, axis=1)).astype(np.int32)
    loss_mask = (~is_eos).astype(np.float32)
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions,
            "loss_mask": loss_mask}


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

    def __init__(self, mixed, caches, eos_id, seq_len, global_batch_size, process_index, local_batch):
        self.mixed = mixed
        self.tokens = [c.train_tokens for c in caches]
        self.eos_id = eos_id
        self.seq_len = seq_len
        self.first = process_index * local_batch
        self.global_batch_size = global_batch_size
        self.local_batch = local_batch

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        base = int(step) * self.global_batch_size + self.first
        picks = [self.mixed[base + r] for r in range(self.local_batch)]
        src = np.fromiter((s for s, _ in picks), dtype=np.int64, count=len(picks))
        win = np.fromiter((w for _, w in picks), dtype=np.int64, count=len(picks))
        dtype = self.tokens[0].dtype
        windows = np.empty((self.local_batch, self.seq_len + 1), dtype=dtype)
        for s in np.unique(src):
            rows = src == s
            windows[rows] = _gather(self.tokens[s], win[rows], self.seq_len)
        return pack_windows(windows, self.eos_id)


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
        import grain

        self.dataset = batches  # grain.MapDataset: step -> batch
        self.fingerprint = fingerprint
        self._read_options = grain.ReadOptions(num_threads=1 if prefetch > 0 else 0,
                                               prefetch_buffer_size=max(0, int(prefetch)))
        self._it = iter(batches.to_iter_dataset(self._read_options))

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
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
) -> TrainIterator:
    """Shuffled, repeated, weight-mixed, packed training batches for this process.

    Each batch is a dict of `[global_batch_size // process_count, seq_len]` arrays (int32;
    `loss_mask` float32); process i gets rows `[i*b, (i+1)*b)` of every global batch.
    """
    import grain

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
    batch_fn = _BatchFn(mixed, caches, caches[0].eos_id, seq_len, global_batch_size, int(process_index),
                        local)
    batches = grain.MapDataset.range(len(mixed) // global_batch_size).map(batch_fn)
    fp = hashlib.sha256(json.dumps({
        "caches": [c.key for c in caches], "weights": weights, "seq_len": seq_len,
        "global_batch_size": global_batch_size, "seed": int(seed), "version": 1,
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
) -> list[dict[str, np.ndarray]]:
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
