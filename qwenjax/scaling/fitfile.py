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
from qwenjax.scaling.loss_law import fit_loss_law

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
    return {
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
    return fit
