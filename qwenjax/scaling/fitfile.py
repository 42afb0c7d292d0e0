"""FIT.json: everything one fit produced, self-describing, so predictions never need the sweep again.

Assembled by `make_fit`, written atomically by `save_fit` (a crashed write never leaves half a file that
`train --hparams` would read), read back and checked by `load_fit`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from qwenjax.errors import UserError
from qwenjax.scaling.bootstrap import CI_LEVEL
from qwenjax.scaling.holdout import holdout_validation
from qwenjax.scaling.hparams import DEFAULT_METHOD, fit_hparam_laws
from qwenjax.scaling.landscape import ladder_checks
from qwenjax.scaling.loss_law import PARAMS, fit_loss_law
from qwenjax.scaling.quality import assess

FORMAT = "qwenjax-fit/1"
CONVENTIONS = {
    "N": "non-embedding parameters (decoder layers + final norm), the results' n_params",
    "D": "training tokens of the run",
    "lr": "peak learning rate",
    "batch_tokens": "batch size in tokens per optimizer step (sequences x seq_len)",
    "C": "6 N D, for the compute-optimal split of the loss law",
    "ci": f"{CI_LEVEL:.0%} percentile interval over bootstrap resamples of (N, D) cells "
    "(of points, for the loss law)",
}


def data_summary(df: pd.DataFrame) -> dict:
    """What the fit saw: files, run counts by status, cells, and the N and D ranges of successful runs."""
    valid = df[df["valid"]]
    return {
        "files": [Path(p).name for p in df.attrs.get("files", [])],
        "loss_column": df.attrs.get("loss_column"),
        "runs": int(len(df)),
        "runs_valid": int(len(valid)),
        "runs_by_status": {str(k): int(v) for k, v in df["status"].value_counts().items()},
        "skipped_lines": int(df.attrs.get("skipped_lines", 0)),
        "loss_column_switch": df.attrs.get("loss_column_switch"),
        "dropped": df.attrs.get("dropped"),
        "cells": int(len(valid[["n_params", "tokens"]].drop_duplicates())),
        "n_params_values": sorted(float(v) for v in valid["n_params"].unique()),
        "tokens_values": sorted(float(v) for v in valid["tokens"].unique()),
        "n_params_range": [float(valid["n_params"].min()), float(valid["n_params"].max())],
        "tokens_range": [float(valid["tokens"].min()), float(valid["tokens"].max())],
        "seq_len": sorted(int(v) for v in df["seq_len"].dropna().unique()) if "seq_len" in df else [],
    }


def make_fit(
    df: pd.DataFrame,
    tolerance: float = 0.0025,
    method: str = DEFAULT_METHOD,
    batch_law: str = "ND",
    loss_law: bool = True,
    bootstrap: int = 1000,
    seed: int = 0,
    prior: str | dict | None = None,
    holdout: str | None = None,
    progress=None,
) -> dict:
    """Fit everything on a results table and return the FIT.json dict.

    `prior` configures the "prior" estimator (docs/scaling.md); `holdout` (e.g. "largest", "N>=1M") also
    fits without those cells and reports how the prediction does on them (`holdout` in FIT.json).
    A loss law that cannot be fitted (too few cells) is left out with a note rather than failing the
    hyperparameter laws, which are what training needs.
    """
    if bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {bootstrap}")
    options = dict(tolerance=tolerance, method=method, batch_law=batch_law, bootstrap=bootstrap, seed=seed, prior=prior)
    hp = fit_hparam_laws(df, **options, progress=progress)  # progress(done, total) of the bootstrap
    held = holdout_validation(df, holdout, **options) if holdout is not None else None
    notes = []
    law = None
    if loss_law:
        try:
            law = fit_loss_law(df, bootstrap=bootstrap, seed=seed)
        except UserError as e:
            notes.append(f"loss law not fitted: {e}")
    fit = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "conventions": CONVENTIONS,
        "data": data_summary(df),
        "method": hp["method"],
        "laws": hp["laws"],
        "loss_law": law,
        "regret": hp["regret"],
        "cell_optima": hp["cell_optima"],
        "noise": hp["noise"],
        "holdout": held,
        "landscape": ladder_checks(df),
        "notes": notes,
    }
    fit["quality"] = assess(fit)
    return fit


def _clean(obj):
    """JSON has no NaN: write null instead (and plain floats for numpy scalars)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_fit(fit: dict, path: str | Path) -> Path:
    """Write FIT.json atomically: a temporary file in the same directory, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not mkstemp: keep the umask's permissions
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_clean(fit), f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def format_law(law: dict) -> str:
    """One line: the formula and each coefficient with its bootstrap interval."""
    coef = ", ".join(
        f"{k} = {v['value']:.4g} [{v['ci'][0]:.4g}, {v['ci'][1]:.4g}]"
        if v["ci"][0] is not None
        else f"{k} = {v['value']:.4g}"
        for k, v in law["coef"].items()
    )
    return f"{law['formula']}: {coef}"


def load_fit(path: str | Path) -> dict:
    """Read a FIT.json written by `qwenjax fit`, with one clear error if it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"fit file not found: {path}")
    try:
        fit = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(fit, dict) or fit.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a qwenjax fit (expected format {FORMAT!r}); create one with `qwenjax fit`"
        )
    check_fit(fit, str(path))
    return fit


def _fail(where: str, key: str, problem: str):
    raise UserError(f"{where}: {key} {problem}; rewrite it with `qwenjax fit`")


def _numbers(value, where: str, key: str, length: int | None = None) -> list:
    """A list of finite numbers (of `length`), else one UserError naming the key."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        _fail(where, key, f"must be a list of {length or 'some'} numbers, got {str(value)[:80]}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            _fail(where, key, f"must hold finite numbers, got {v!r}")
    return value


def _mapping(fit: dict, key: str, where: str, name: str | None = None) -> dict:
    value = fit.get(key)
    if not isinstance(value, dict):
        _fail(where, name or key, "is missing" if value is None else "must be a mapping")
    return value


def _check_samples(law: dict, where: str, key: str, width: int) -> None:
    boot = law.get("bootstrap")
    samples = boot.get("samples") if isinstance(boot, dict) else None
    if not isinstance(samples, list):
        _fail(where, f"{key}.bootstrap.samples", "must be a list")
    for row in samples:
        _numbers(row, where, f"{key}.bootstrap.samples", width)


def _check_coef(law: dict, where: str, key: str) -> None:
    coef = _mapping(law, "coef", where, f"{key}.coef")
    for name, c in coef.items():
        if not isinstance(c, dict) or "value" not in c or "ci" not in c:
            _fail(where, f"{key}.coef.{name}", "must have a value and a ci")
        _numbers([c["value"]], where, f"{key}.coef.{name}.value", 1)
        ci = c["ci"]
        if not isinstance(ci, list) or len(ci) != 2 or not (all(v is None for v in ci) or all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in ci)):
            _fail(where, f"{key}.coef.{name}.ci", "must be [lo, hi] numbers or [null, null]")


def check_fit(fit: dict, where: str = "FIT.json") -> None:
    """Every key `predict`, `train --hparams`, the sweep's `around:` grids and the plots read, with the right
    types and finite numbers: one UserError naming the first key that is not."""
    laws = _mapping(fit, "laws", where)
    for key in ("lr", "batch_tokens"):
        law = laws.get(key)
        if not isinstance(law, dict):
            _fail(where, f"laws.{key}", "is missing" if law is None else "must be a mapping")
        inputs = law.get("inputs")
        if not isinstance(inputs, list) or not inputs or not set(inputs) <= {"N", "D"} or len(set(inputs)) != len(
                inputs):
            _fail(where, f"laws.{key}.inputs", f"must be a list of N and/or D, got {inputs!r}")
        if "log_coef" not in law:
            _fail(where, f"laws.{key}.log_coef", "is missing")
        _numbers(law["log_coef"], where, f"laws.{key}.log_coef", 1 + len(inputs))
        _check_coef(law, where, f"laws.{key}")
        _check_samples(law, where, f"laws.{key}", 1 + len(inputs))
    data = _mapping(fit, "data", where)
    for key in ("n_params_range", "tokens_range"):
        values = _numbers(data.get(key), where, f"data.{key}", 2)
        if not 0 < values[0] <= values[1]:
            _fail(where, f"data.{key}", f"must be [lo, hi] with 0 < lo <= hi, got {values}")
    law = fit.get("loss_law")
    if law is not None:
        if not isinstance(law, dict):
            _fail(where, "loss_law", "must be a mapping or null")
        theta = _mapping(law, "theta", where, "loss_law.theta")
        _numbers([theta.get(p) for p in PARAMS], where, "loss_law.theta", len(PARAMS))
        _check_coef(law, where, "loss_law")
        for name in ("E", "A", "B", "alpha", "beta"):
            if name not in law["coef"]:
                _fail(where, f"loss_law.coef.{name}", "is missing")
        _check_samples(law, where, "loss_law", len(PARAMS))
    for key in ("cell_optima",):
        cells = fit.get(key, [])
        if not isinstance(cells, list) or not all(
                isinstance(c, dict) and _is_positive(c.get("n_params")) and _is_positive(c.get("tokens"))
                for c in cells):
            _fail(where, key, "must be a list of cells with positive n_params and tokens")
    q = fit.get("quality")
    if q is not None and not (isinstance(q, dict) and q.get("status") in ("ok", "warning", "unusable")
                              and isinstance(q.get("laws"), dict) and isinstance(q.get("flags"), list)
                              and all(_is_flag(f) for f in q["flags"])):
        _fail(where, "quality", "must hold a status (ok, warning or unusable), laws and flags")


def _is_flag(flag) -> bool:
    return (isinstance(flag, dict) and isinstance(flag.get("message"), str) and isinstance(flag.get("code"), str)
            and flag.get("severity") in ("warning", "unusable"))


def _is_positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_output(path: str | os.PathLike, what: str, directory: bool = False) -> Path:
    """Fail with one line, before any work, if `path` (a file, or with `directory` a folder) cannot be written:
    an existing file or folder in the way, a parent that is a file, or no write permission."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise UserError(f"{what} {path} is {kind}")
    parent = path if directory and path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{what} {path} is not writable")
    return path
