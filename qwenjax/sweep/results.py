"""The sweep's record: `results.jsonl`, one JSON line per finished run, appended and never rewritten.

Several worker processes append to the same file, and the sweep may be killed at any moment, so an append
is one `os.write` of a complete line on an `O_APPEND` descriptor under an exclusive `fcntl.flock`, followed
by `fsync`: a line is either entirely there or not at all. A reader ignores a trailing line without its
newline (a writer killed mid-way, which the lock and single write make all but impossible, or a file cut by
a crash) and skips malformed lines, so a damaged file never stops a resume. If a torn tail is found by a
writer, it starts its line on a fresh line so that its own record is never glued to the fragment.

The state of a sweep is derived from this file alone: a run whose latest line is `ok` or `diverged` is
done; a `failed` one is retried by the next invocation.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DONE = ("ok", "diverged")
STATUSES = ("ok", "diverged", "failed")
#: fields every result line has (values may be None where unknown, e.g. losses of a failed run)
REQUIRED_FIELDS = (
    "run_id", "name", "n_params", "n_params_total", "tokens", "lr", "batch_size", "batch_tokens", "seq_len",
    "seed", "final_loss", "eval_loss", "diverged", "status", "flops", "wall_s", "compile_s", "hidden_size",
    "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
    "grid", "mode", "finished_at",
)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _json_safe(x: Any) -> Any:
    """NaN/inf are not JSON: write them as null (a diverged run's loss) so every line parses strictly."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / jax scalars
        return _json_safe(x.item())
    return x


def append_line(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON object as one line, atomically with respect to other appenders and to kills."""
    data = (json.dumps(_json_safe(record), sort_keys=False, allow_nan=False) + "\n").encode("utf-8")
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


def read_lines(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(records, number of malformed lines skipped); a trailing line without newline is ignored."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] != b"":  # torn tail
        lines = lines[:-1]
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict) and "run_id" in obj:
            records.append(obj)
        else:
            bad += 1
    return records, bad


class ResultsStore:
    """`DIR/results.jsonl` and what it says about each run."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "results.jsonl"

    def append(self, row: dict) -> None:
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"result line lacks {', '.join(missing)}")
        if row["status"] not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {row['status']!r}")
        append_line(self.path, row)

    def read(self) -> list[dict]:
        return read_lines(self.path)[0]

    def latest(self, rows: Iterable[dict] | None = None) -> dict[str, dict]:
        """run_id -> its last line (a retried run's last attempt wins)."""
        out: dict[str, dict] = {}
        for row in self.read() if rows is None else rows:
            out[row["run_id"]] = row
        return out

    def done_ids(self) -> set[str]:
        return {rid for rid, row in self.latest().items() if row.get("status") in DONE}
