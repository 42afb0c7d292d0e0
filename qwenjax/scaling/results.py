"""Read sweep `results.jsonl` files into one table, deciding once which runs may count as optima.

A results file is append-only and written by a sweep that may have been killed, so a torn or hand-edited
line must not sink a fit: by default malformed lines are skipped and counted (`df.attrs["skipped_lines"]`);
`strict=True` rejects the file at the first one, naming the line.

The loss column is chosen once for the whole table and never silently: when some successful runs lack
`eval_loss`, the fit falls back to `final_loss` for every run and `df.attrs["loss_column_switch"]` records
how many rows forced it; with an explicit column, runs without it are dropped and counted
(`df.attrs["dropped"]`). `scaling.quality` turns both into flags.
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
#: optional fields that, when present, must be positive numbers (or scalars, for the identifiers)
_OPTIONAL_POSITIVE = ("batch_size", "seq_len")
_SCALARS = ("run_id", "seed", "name")
#: what a malformed line can raise while parsed and checked (deep nesting, huge integers, odd types)
_LINE_ERRORS = (ValueError, TypeError, OverflowError, RecursionError)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """A number that is finite as a float (an integer too large for one is not)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _record(obj, where: str) -> dict:
    """Check one parsed line and fill derived fields; raise ValueError naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    row = dict(obj)
    for key in _OPTIONAL_POSITIVE:
        value = row.get(key)
        if value is not None and not (_is_finite(value) and value > 0):
            raise ValueError(f"{key} must be a positive number, got {value!r}")
    for key in _SCALARS:
        if isinstance(row.get(key), dict | list):
            raise ValueError(f"{key} must be a string or a number, got {row[key]!r}")
    seed = row.get("seed")
    if seed is not None and not _is_finite(seed):
        raise ValueError(f"seed must be a number, got {seed!r}")
    if (
        row.get("batch_tokens") is None
        and _is_number(row.get("batch_size"))
        and _is_number(row.get("seq_len"))
    ):
        row["batch_tokens"] = row["batch_size"] * row["seq_len"]
    for key in _POSITIVE:
        value = row.get(key)
        if not _is_finite(value) or value <= 0:
            raise ValueError(f"{key} must be a positive number, got {value!r}")
    diverged = bool(row.get("diverged", False))
    status = row.get("status") or ("diverged" if diverged else "ok")
    if status not in ("ok", "diverged", "failed", "interrupted"):  # interrupted: saved, not finished
        raise ValueError(f"status must be ok, diverged, failed or interrupted, got {status!r}")
    row["status"] = "diverged" if diverged and status == "ok" else status
    row["diverged"] = row["status"] == "diverged"
    for key in LOSS_COLUMNS:
        value = row.get(key)
        row[key] = float(value) if _is_finite(value) else math.nan
    row["source"] = where
    return row


def _read_file(path: Path, strict: bool) -> tuple[list[dict], list[int]]:
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    rows, bad = [], []
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rows.append(_record(json.loads(raw.decode("utf-8")), path.name))
                except _LINE_ERRORS as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                    if strict:
                        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                        raise UserError(f"{path}:{lineno}: malformed results line ({reason})") from None
                    bad.append(lineno)
    except OSError as e:
        raise UserError(f"cannot read results file {path}: {e.strerror or e}") from None
    return rows, bad


def choose_loss_column(df: pd.DataFrame, loss_column: str | None = None) -> str:
    """`eval_loss` if every successful run has one, else `final_loss`: never mix the two within one fit.

    `load_results` records the fallback (`attrs["loss_column_switch"]`) so the fit can flag it."""
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
    usable = np.isfinite(df["loss"]) & (df["loss"] > 0)
    df["valid"] = (df["status"] == "ok") & usable
    ok_without = int(((df["status"] == "ok") & ~usable).sum())
    switch = None
    if loss_column is None and column != LOSS_COLUMNS[0] and (df["status"] == "ok").any():
        missing = int(((df["status"] == "ok") & ~np.isfinite(df[LOSS_COLUMNS[0]])).sum())
        switch = {"from": LOSS_COLUMNS[0], "to": column, "rows": missing, "of": int((df["status"] == "ok").sum()),
                  "reason": f"{missing} ok run(s) have no finite {LOSS_COLUMNS[0]}; every run uses {column} "
                  f"(pass --loss-column {LOSS_COLUMNS[0]} to drop those runs instead)"}
    dropped = None
    if ok_without:
        dropped = {"rows": ok_without, "reason": f"ok run(s) without a finite positive {column}"}
    df.attrs.update(
        files=[str(p) for p in paths],
        loss_column=column,
        loss_column_switch=switch,
        dropped=dropped,
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
