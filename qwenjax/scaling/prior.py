"""The prior the `prior` estimator shrinks the exponents toward: Step Law's by default, or the user's `--prior`.

Schema (a JSON object, given inline or as the path of a JSON file): any of `alpha`, `beta` (lr* exponents
in N and D), `gamma`, `delta` (B* exponents in N and D) as numbers, and optionally `sd`, either one number
for every exponent or an object with any of those four keys. Keys left out keep Step Law's mean and the
default sd. Example: {"alpha": -0.713, "beta": 0.307, "sd": {"alpha": 0.2}}.

A FIT.json written by `qwenjax fit` is a prior too: its fitted exponents are the means and their bootstrap
standard deviations the sds, so a small new sweep can lean on an earlier, larger study of the same regime.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from qwenjax.errors import UserError

#: Step Law (Li et al. 2025): lr* = 1.79 N^-0.713 D^0.307, B* = 0.58 D^0.571 (B independent of N).
STEP_LAW = {"alpha": -0.713, "beta": 0.307, "gamma": 0.0, "delta": 0.571}
#: ... and its coefficients: lr* = a N^alpha D^beta, B* = b N^gamma D^delta (tokens)
STEP_LAW_COEF = {"a": 1.79, "b": 0.58}
#: Prior standard deviation of each exponent: wide against Step Law's own bootstrap sds (0.02-0.03), since
#: a CPU ladder lives far from where those were measured, yet narrow enough to keep the signs of exponents
#: that two noisy token budgets cannot pin down.
DEFAULT_SD = 0.2
EXPONENTS = tuple(STEP_LAW)


def _number(value, where: str, positive: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        kind = "a positive number" if positive else "a number"
        raise UserError(f"--prior: {where} must be {kind}, got {value!r}")
    return float(value)


def parse_prior(value: str | dict | None = None) -> dict:
    """{"mean": {exponent: value}, "sd": {exponent: sd}, "source": ...} from a JSON text, a file or a dict.

    Raises UserError (one line, naming the bad key) on unknown keys, non-numbers, non-positive sds or text
    that is neither JSON nor a readable JSON file.
    """
    source = "Step Law (Li et al. 2025)"
    if value is None:
        obj = {}
    elif isinstance(value, dict):
        obj, source = value, "given"
    else:
        text = str(value).strip()
        if not text.startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise UserError(f"--prior must be a JSON object or the path of a JSON file, got {value!r}")
            text, source = path.read_text(encoding="utf-8"), path.name
        else:
            source = "given"
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise UserError(f"--prior is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"--prior must be a JSON object, got {type(obj).__name__}")
    if "laws" in obj and "format" in obj:
        return prior_from_fit(obj, source)
    allowed = ", ".join((*EXPONENTS, "sd"))
    for key in obj:
        if key not in (*EXPONENTS, "sd"):
            raise UserError(f"--prior: unknown key {key!r} (allowed: {allowed})")
    mean = {k: _number(obj[k], k) if k in obj else v for k, v in STEP_LAW.items()}
    sd_given = obj.get("sd", {})
    if isinstance(sd_given, dict):
        for key in sd_given:
            if key not in EXPONENTS:
                raise UserError(f"--prior: unknown key 'sd.{key}' (allowed: {', '.join(EXPONENTS)})")
        sd = {k: _number(sd_given[k], f"sd.{k}", positive=True) if k in sd_given else DEFAULT_SD for k in EXPONENTS}
    else:
        one = _number(sd_given, "sd", positive=True)
        sd = dict.fromkeys(EXPONENTS, one)
    return {"mean": mean, "sd": sd, "source": source}


def prior_from_fit(fit: dict, source: str = "a fit") -> dict:
    """The prior of a FIT.json: each exponent's fitted value as the mean, its bootstrap sd (at least 0.02, so
    that an over-confident fit cannot freeze an exponent) as the sd; exponents the fit lacks keep Step Law's."""
    names = {"lr": ("alpha", "beta"), "batch_tokens": ("gamma", "delta")}
    mean, sd = dict(STEP_LAW), dict.fromkeys(EXPONENTS, DEFAULT_SD)
    try:
        for target, (n_exp, d_exp) in names.items():
            law = fit["laws"][target]
            columns = {"N": n_exp, "D": d_exp}
            samples = np.asarray(law["bootstrap"]["samples"], float).reshape(-1, len(law["log_coef"]))
            for j, inp in enumerate(law["inputs"], start=1):
                name = columns[inp]
                mean[name] = _number(float(law["log_coef"][j]), f"laws.{target} exponent of {inp}")
                good = samples[np.isfinite(samples[:, j]), j] if len(samples) else samples[:, :0]
                if len(good) > 2:
                    sd[name] = max(float(np.std(good, ddof=1)), 0.02)
    except (KeyError, TypeError, IndexError) as e:
        raise UserError(f"--prior: {source} is not a complete qwenjax fit ({e})") from None
    return {"mean": mean, "sd": sd, "source": source}
