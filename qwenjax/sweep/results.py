"""The sweep's record: `results.jsonl`, one JSON line per finished run, appended and never rewritten;
what a line holds (`result_row`) and which loss judges it (`row_loss`).

Several worker processes append to the same file, and the sweep may be killed at any moment: appends and
reads go through `qwenjax.jsonl` (whole lines under a lock, fsynced; a torn tail or a malformed line is
skipped, so a damaged file never stops a resume).

The state of a sweep is derived from this file alone: a run whose latest line is `ok` or `diverged` is
done; a `failed` or `interrupted` one is trained again by the next invocation (an interrupted one resumes
from its checkpoint). A run that finished (its run directory has a `summary.json`) but has no line, because
the sweep was killed between the two, is recovered from its run directory without training again
(`recover_finished`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import yaml

from qwenjax import jsonl

DONE = ("ok", "diverged")
#: `interrupted`: stopped by SIGTERM/SIGINT after saving a checkpoint; like `failed`, not a result (the next
#: invocation trains it again, and the trainer resumes from that checkpoint), but not counted as a failure
STATUSES = ("ok", "diverged", "failed", "interrupted")
#: fields every result line has (values may be None where unknown, e.g. losses of a failed run)
REQUIRED_FIELDS = (
    "run_id", "name", "n_params", "n_params_total", "tokens", "lr", "batch_size", "batch_tokens", "seq_len",
    "seed", "final_loss", "eval_loss", "diverged", "status", "flops", "wall_s", "compile_s", "hidden_size",
    "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
    "grid", "mode", "finished_at",
)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def append_line(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON object as one line, atomically with respect to other appenders and to kills."""
    jsonl.append(path, record)


def read_lines(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(records, number of malformed lines skipped); a trailing line without newline is ignored."""
    return jsonl.read_counted(path, key="run_id")


def row_loss(row: dict) -> float:
    """The loss a result line is judged by (best run of a cell, grid edges, progress, reports): the held-out
    `eval_loss` if finite, else the final training loss; inf unless the run is `ok` with a finite loss."""
    if row.get("status") != "ok":
        return math.inf
    for key in ("eval_loss", "final_loss"):
        v = row.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return math.inf


def result_row(payload: dict, summary: dict | None, *, wall_s: float, compile_s: float | None, mode: str,
               error: str | None = None, recovered: bool = False, interrupted: bool = False) -> dict:
    """A complete result line: the planned fields (`payload["row"]`) plus what the run reported."""
    row = dict(payload["row"])
    summary = summary or {}
    diverged = bool(summary.get("diverged", False))
    status = "interrupted" if interrupted else "failed" if error else "diverged" if diverged else "ok"
    row.update(
        final_loss=summary.get("final_loss"), eval_loss=summary.get("eval_loss"), diverged=diverged,
        status=status, wall_s=round(float(summary.get("wall_s", wall_s) if recovered else wall_s), 3),
        compile_s=None if compile_s is None else round(float(compile_s), 3), mode=mode, finished_at=now_iso(),
    )
    for key in ("diverged_step", "diverged_at", "steps_done"):
        if key in summary:
            row[key] = summary[key]
    if summary.get("fork_of"):  # started from a longer run's state (the trainer's record): that run's id
        row.update(fork_of=Path(summary["fork_of"]).name, fork_step=summary["fork_step"])
    if error:
        row["error"] = error
    if recovered:
        row["recovered"] = True
    return row


def recover_finished(payload: dict) -> dict | None:
    """The row of a run that finished (summary.json written) but was not recorded: the sweep was killed
    between the two. Only trusted when the run directory's config is this run's config."""
    run_dir = Path(payload["config"]["run_dir"])
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary_path.is_file() or not config_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text())
        saved = yaml.safe_load(config_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or "final_loss" not in summary or saved != payload["config"]:
        return None
    if summary.get("finished") is False:
        return None
    return result_row(payload, summary, wall_s=float(summary.get("wall_s") or 0.0),
                      compile_s=summary.get("compile_s"), mode=summary.get("mode", "solo"), recovered=True)


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
