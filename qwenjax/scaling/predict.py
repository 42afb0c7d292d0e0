"""Hyperparameters (and loss) for a new (N, D) from a saved fit: what `predict` and `train --hparams` use."""

from __future__ import annotations

import math

import numpy as np

from qwenjax.config import param_counts, preset
from qwenjax.errors import UserError
from qwenjax.scaling.hparams import evaluate_law
from qwenjax.scaling.loss_law import evaluate_loss_law
from qwenjax.scaling.units import batch_sequences, format_count, parse_count

#: The seven Qwen2.5 dense sizes and their pretraining budget (Qwen2.5 report: 18T tokens).
QWEN25_PRESETS = (
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "qwen2.5-7b",
    "qwen2.5-14b",
    "qwen2.5-32b",
    "qwen2.5-72b",
)
QWEN25_TOKENS = 18e12


def preset_n_params(name: str) -> float:
    """Non-embedding parameter count N of a model preset (counted from its shapes: no JAX)."""
    return float(param_counts(preset(name))[1])


def _check_positive_int(value, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value!r}")


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def extrapolation_warning(fit: dict, n_params: float, tokens: float) -> str | None:
    """Say how far (N, D) lies outside the fitted data, as a factor; None inside."""
    parts = []
    for symbol, value, key in (("N", n_params, "n_params_range"), ("D", tokens, "tokens_range")):
        lo, hi = fit["data"][key]
        if value > hi:
            parts.append(
                f"{symbol} = {format_count(value)} is {value / hi:.3g}x above the largest fitted "
                f"{symbol} ({format_count(hi)})"
            )
        elif value < lo:
            parts.append(
                f"{symbol} = {format_count(value)} is {lo / value:.3g}x below the smallest fitted "
                f"{symbol} ({format_count(lo)})"
            )
    return "extrapolating: " + "; ".join(parts) if parts else None


def predict(fit: dict, n_params, tokens, seq_len: int | None = None, multiple_of: int = 1) -> dict:
    """lr, batch_tokens (with 95% CIs), batch_size in sequences and, if fitted, loss at (N, D).

    `batch_size` = batch_tokens / seq_len rounded to a positive multiple of `multiple_of` (the data-parallel
    size the mesh must split); it is None without `seq_len`. `warning` appears when N or D lies outside
    the fitted range.
    """
    n = parse_count(n_params, "--params")
    d = parse_count(tokens, "--tokens")
    _check_positive_int(multiple_of, "--multiple-of")
    if seq_len is not None:
        _check_positive_int(seq_len, "--seq-len")
    lr, lr_ci = evaluate_law(fit["laws"]["lr"], n, d)
    batch, batch_ci = evaluate_law(fit["laws"]["batch_tokens"], n, d)
    out = {
        "n_params": n,
        "tokens": d,
        "lr": _sig(float(lr)),
        "lr_ci": [_sig(float(v)) for v in lr_ci],
        "batch_tokens": _sig(float(batch)),
        "batch_tokens_ci": [_sig(float(v)) for v in batch_ci],
        "seq_len": seq_len,
        "batch_size": None,
    }
    if seq_len is not None:
        out["batch_size"] = batch_sequences(float(batch), seq_len, multiple_of)
    if fit.get("loss_law"):
        loss, loss_ci = evaluate_loss_law(fit["loss_law"], n, d)
        out["loss"], out["loss_ci"] = _sig(float(loss)), [_sig(float(v)) for v in loss_ci]
    warning = extrapolation_warning(fit, n, d)
    if warning:
        out["warning"] = warning
    return out
