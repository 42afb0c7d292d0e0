"""Read sweep `results.jsonl` files into one table, deciding once which runs may count as optima.

A results file is append-only and written by a sweep that may have been killed, so a torn or hand-edited
line must not sink a fit: by default malformed lines are skipped and counted (`df.attrs["skipped_lines"]`);
`strict=True` rejects the file at the first one, naming the line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from qwenjax.errors import UserError

#: Loss columns a sweep writes; the default prefers held-out loss and falls back to the final training loss.
LOSS_COLUMNS = ("eval_loss", "final_loss")
_POSITIVE = ("n_params", "tokens", "lr", "batch_tokens")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _record(obj, where: str) -> dict:
    """Check one parsed line and fill derived fields; raise ValueError naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    row = dict(obj)
    if (
        row.get("batch_tokens") is None
        and _is_number(row.get("batch_size"))
        and _is_number(row.get("seq_len"))
    ):
        row["batch_tokens"] = row["batch_size"] * row["seq_len"]
    for key in _POSITIVE:
        value = row.get(key)
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key} must be a positive number, got {value!r}")
    diverged = bool(row.get("diverged", False))
    status = row.get("status") or ("diverged" if diverged else "ok")
    if status not in ("ok", "diverged", "failed"):
        raise ValueError(f"status must be ok, diverged or failed, got {status!r}")
    row["status"] = "diverged" if diverged and status == "ok" else status
    row["diverged"] = row["status"] == "diverged"
    for key in LOSS_COLUMNS:
        value = row.get(key)
        row[key] = float(value) if _is_number(value) else math.nan
    row["source"] = where
    return row


def _read_file(path: Path, strict: bool) -> tuple[list[dict], list[int]]:
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    rows, bad = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_record(json.loads(line), path.name))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if strict:
                    raise UserError(f"{path}:{lineno}: malformed results line ({e})") from None
                bad.append(lineno)
    return rows, bad


def choose_loss_column(df: pd.DataFrame, loss_column: str | None = None) -> str:
    """`eval_loss` if every successful run has one, else `final_loss`: never mix the two within one fit."""
    if loss_column is not None:
        if loss_column not in df.columns:
            raise UserError(
                f"loss column {loss_column!r} is not in the results (have {', '.join(LOSS_COLUMNS)})"
            )
        return loss_column
    ok = df["status"] == "ok"
    if ok.any() and np.isfinite(df.loc[ok, "eval_loss"]).all():
        return "eval_loss"
    return "final_loss"


def load_results(
    paths: str | Path | Iterable[str | Path], loss_column: str | None = None, strict: bool = False
) -> pd.DataFrame:
    """All runs of one or more results files, one row each, with `loss` (the chosen column) and `valid`.

    `valid` marks runs that may be optima: status ok, not diverged, finite positive loss. Failed and
    diverged runs stay in the table so plots can show where the landscape ends. A run_id seen twice
    (a resumed sweep rerunning a failed run) keeps its last line.
    """
    paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not paths:
        raise UserError("no results files given")
    rows, skipped = [], {}
    for path in paths:
        file_rows, bad = _read_file(path, strict)
        rows += file_rows
        if bad:
            skipped[str(path)] = bad
    if not rows:
        names = ", ".join(str(p) for p in paths)
        extra = f" ({sum(map(len, skipped.values()))} malformed lines skipped)" if skipped else ""
        raise UserError(f"no runs in {names}{extra}")
    df = pd.DataFrame(rows)
    if "run_id" in df.columns:
        has_id = df["run_id"].notna()
        df = pd.concat([df[has_id].drop_duplicates("run_id", keep="last"), df[~has_id]]).sort_index()
    df = df.reset_index(drop=True)
    column = choose_loss_column(df, loss_column)
    df["loss"] = pd.to_numeric(df[column], errors="coerce").astype(float)
    df["valid"] = (df["status"] == "ok") & np.isfinite(df["loss"]) & (df["loss"] > 0)
    df.attrs.update(
        files=[str(p) for p in paths],
        loss_column=column,
        skipped_lines=sum(map(len, skipped.values())),
        skipped_at={k: v[:10] for k, v in skipped.items()},
    )
    return df


def skipped_message(df: pd.DataFrame) -> str | None:
    """One warning line about skipped malformed lines, or None."""
    if not df.attrs.get("skipped_lines"):
        return None
    where = "; ".join(
        f"{Path(p).name} line {', '.join(map(str, lines))}" for p, lines in df.attrs["skipped_at"].items()
    )
    return (
        f"skipped {df.attrs['skipped_lines']} malformed results line(s) ({where}); "
        "use --strict to reject them instead"
    )
