"""JSON-lines files and atomic writes: the one place that reads and writes the append-only records.

`metrics.jsonl` (one line per logged step), a sweep's `results.jsonl` (one line per finished run) and
`population_decisions.jsonl` are written while the process that writes them may be killed at any moment,
and several sweep workers append to the same file. So:

- `append` writes one complete line with a single `os.write` on an `O_APPEND` descriptor under an exclusive
  `fcntl.flock`, then `fsync`s: a line is either entirely there or not at all. If it finds a torn tail (a
  line without its newline), it starts its own line on a fresh line so its record is never glued to it.
- `read` ignores a trailing line without its newline (a writer killed mid-line, or a file cut by a crash)
  and skips malformed lines, so a damaged file never stops a resume; `read_counted` also says how many
  lines it skipped.
- `atomic_write_text` replaces a whole file through a temporary file and `os.replace`: a kill leaves the
  old file or the new one, never half of one.

Standard library only, so every part (the scaling fitter included, which must import without JAX) may use it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def json_safe(x: Any) -> Any:
    """NaN/inf are not JSON: write them as null (a diverged run's loss) so every line parses strictly;
    numpy / JAX scalars become Python numbers."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return json_safe(x.item())
    return x


def append(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON object as one line, atomically with respect to other appenders and to kills."""
    data = (json.dumps(json_safe(record), allow_nan=False) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(path, "rb") as f:  # a torn tail (no newline): start our line on a fresh one
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        data = b"\n" + data
            written = os.write(fd, data)
            while written < len(data):  # a short write (not seen on regular files); finish it under the lock
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_counted(path: str | os.PathLike, *, key: str | None = None) -> tuple[list[dict], int]:
    """(the file's JSON objects, number of malformed lines skipped); a missing file has none. A trailing
    line without its newline is ignored (not counted); with `key`, an object without that field counts as
    malformed."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] != b"":  # torn tail
        lines = lines[:-1]
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            bad += 1
            continue
        if isinstance(obj, dict) and (key is None or key in obj):
            records.append(obj)
        else:
            bad += 1
    return records, bad


def read(path: str | os.PathLike) -> list[dict]:
    """The complete JSON-object lines of a file, in order ([] if it does not exist)."""
    return read_counted(path)[0]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text`: a temporary file in the same folder, fsynced, then `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
