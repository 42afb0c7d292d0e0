"""Corpus files and their documents: the first stage of the data pipeline (see docs/data.md).

`resolve_files(path)` turns a file, a glob or a folder (recursive) into text/JSONL/JSON/Parquet
files; `iter_documents(files)` yields their documents: a text file is one document, JSONL/JSON give
the `text` field of each record, Parquet the `text` column. This module imports nothing else from
`qwenjax.data`, so the tokenizer can train on a corpus without an import cycle.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qwenjax.errors import UserError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")

_SNIFF_BYTES = 8192
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}


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
        import pyarrow.parquet as pq  # local: about 0.1 s of CLI start-up, needed only for Parquet corpora
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
