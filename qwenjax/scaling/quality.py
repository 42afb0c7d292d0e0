"""How good a fit is: flags that `qwenjax fit` records as FIT.json's `quality` and that `predict` and
`train --hparams` repeat, refusing a law flagged unusable unless forced.

A fit always produces numbers; these rules say when the numbers should not be trusted. Each flag has a
`code`, the `law` it concerns (`lr`, `batch_tokens`, `loss_law`, or `data` for the table the fit read), a
`severity` and the numbers behind it:

- `loss_law_at_bound` (unusable): E below `E_FLOOR` (the optimiser drove it to 0), or a loss-law exponent
  outside `EXPONENT_BOUNDS`;
- `wide_prediction` (warning; unusable for lr or batch above `UNUSABLE_SPAN`): the interval of a law's
  prediction at a fitted cell spans more than `WIDE_SPAN` (the widest cell counts);
- `wide_interval` (warning): the interval of E or of an exponent spans more than `WIDE_SPAN` (hi / lo);
- `exponent_spans_zero` (warning): an exponent's interval contains 0 and is wider than `ZERO_WIDTH`, so the
  data cannot tell its sign (a narrow interval around 0 says "no dependence" with confidence);
- `regret_above_noise` (warning): the mean leave-one-cell-out regret exceeds the measured seed-noise floor;
- `loss_column_switched` (warning): some ok runs lacked eval_loss, so every run was compared by final_loss;
- `rows_dropped` (warning): ok runs without a usable loss were left out of the fit;
- `lines_skipped` (warning): malformed results lines were skipped.

Prefactors (a, b, A, B) are the laws at N = D = 1, far outside any data, so their intervals say nothing
about a prediction and are not flagged; the prediction interval at the fitted cells is what matters. A law's
status is its worst flag's severity; the fit's `status` is the worst of all flags.
"""

from __future__ import annotations

import math

import numpy as np

from qwenjax.errors import UserError
from qwenjax.scaling.hparams import evaluate_law
from qwenjax.scaling.loss_law import evaluate_loss_law

#: E (nats) below this is the irreducible loss pushed to its floor of 0, not a measurement.
E_FLOOR = 1e-3
#: Loss-law exponents outside this open interval sit at the edge of what is physical for data this size.
EXPONENT_BOUNDS = (0.05, 2.0)
#: An interval spanning more than this factor gets a warning ...
WIDE_SPAN = 10.0
#: ... and an lr or batch prediction interval at a fitted cell spanning more than this makes the law unusable.
UNUSABLE_SPAN = 100.0
#: An exponent interval across 0 narrower than this is a confident "no dependence" (< 26% per 10x), not a flag.
ZERO_WIDTH = 0.1
SEVERITIES = ("ok", "warning", "unusable")
LAWS = ("lr", "batch_tokens", "loss_law")
_EXPONENTS = {"lr": ("alpha", "beta"), "batch_tokens": ("gamma", "delta"), "loss_law": ("alpha", "beta")}
_LAW_NAMES = {"lr": "lr law", "batch_tokens": "batch law", "loss_law": "loss law", "data": "data"}


def _flag(code: str, law: str, severity: str, message: str, **values) -> dict:
    return {"code": code, "law": law, "severity": severity, "message": f"{_LAW_NAMES[law]}: {message}",
            "values": values}


def span(lo, hi) -> float:
    """hi / lo of an interval of one sign; inf when it touches or crosses 0 or is missing."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return math.inf
    if lo > 0 or hi < 0:
        return max(abs(hi), abs(lo)) / min(abs(hi), abs(lo))
    return math.inf


def _fitted_cells(fit: dict) -> tuple[np.ndarray, np.ndarray]:
    cells = fit.get("cell_optima") or []
    if cells:
        return (np.array([c["n_params"] for c in cells], float), np.array([c["tokens"] for c in cells], float))
    data = fit.get("data") or {}
    n, d = np.meshgrid(data.get("n_params_values") or [], data.get("tokens_values") or [])
    return n.ravel().astype(float), d.ravel().astype(float)


def _prediction_flag(law_key: str, evaluate, law: dict, n, d) -> dict | None:
    if not len(n):
        return None
    value, (lo, hi) = evaluate(law, n, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        spans = np.where((lo > 0) & np.isfinite(hi), hi / lo, np.inf)
    if not len(spans) or np.all(np.isnan(lo)):  # no bootstrap samples: no interval to judge
        return None
    i = int(np.argmax(spans))
    worst = float(spans[i])
    if worst <= WIDE_SPAN:
        return None
    severity = "unusable" if law_key != "loss_law" and worst > UNUSABLE_SPAN else "warning"
    return _flag("wide_prediction", law_key, severity,
                 f"prediction interval at fitted cell N={n[i]:.3g} D={d[i]:.3g} spans {worst:.3g}x "
                 f"[{float(lo[i]):.3g}, {float(hi[i]):.3g}] (> {WIDE_SPAN:g}x)",
                 n_params=float(n[i]), tokens=float(d[i]), value=float(np.asarray(value)[i]),
                 ci=[float(lo[i]), float(hi[i])], span=worst)


def _coef_flags(law_key: str, coef: dict, names) -> list[dict]:
    flags = []
    for name in names:
        if name not in coef:
            continue
        value, (lo, hi) = coef[name]["value"], coef[name]["ci"]
        if lo is None or hi is None:
            continue
        if name != "E" and lo < 0 < hi:
            if hi - lo <= ZERO_WIDTH:
                continue
            flags.append(_flag("exponent_spans_zero", law_key, "warning",
                               f"{name} = {value:.3g} [{lo:.3g}, {hi:.3g}] spans zero: its sign is unknown",
                               coef=name, value=value, ci=[lo, hi]))
        elif span(lo, hi) > WIDE_SPAN:
            width = span(lo, hi)
            shown = "an unbounded factor" if math.isinf(width) else f"{width:.3g}x"
            flags.append(_flag("wide_interval", law_key, "warning",
                               f"{name} = {value:.3g} [{lo:.3g}, {hi:.3g}] spans {shown} (> {WIDE_SPAN:g}x)",
                               coef=name, value=value, ci=[lo, hi], span=None if math.isinf(width) else width))
    return flags


def _loss_law_flags(law: dict, n, d) -> list[dict]:
    coef = law["coef"]
    flags = []
    e = coef["E"]["value"]
    if e < E_FLOOR:
        flags.append(_flag("loss_law_at_bound", "loss_law", "unusable",
                           f"E = {e:.3g} is at its floor (< {E_FLOOR:g}): the irreducible loss was not measured",
                           coef="E", value=e, bound=E_FLOOR))
    lo_b, hi_b = EXPONENT_BOUNDS
    for name in ("alpha", "beta"):
        value = coef[name]["value"]
        if not lo_b < value < hi_b:
            flags.append(_flag("loss_law_at_bound", "loss_law", "unusable",
                               f"{name} = {value:.3g} is outside ({lo_b:g}, {hi_b:g})",
                               coef=name, value=value, bounds=list(EXPONENT_BOUNDS)))
    flags += _coef_flags("loss_law", coef, ("E", "alpha", "beta"))
    flags.append(_prediction_flag("loss_law", evaluate_loss_law, law, n, d))
    return flags


def _data_flags(fit: dict) -> list[dict]:
    data = fit.get("data") or {}
    flags = []
    switch = data.get("loss_column_switch")
    if switch:
        flags.append(_flag("loss_column_switched", "data", "warning",
                           f"{switch['reason']}", rows=switch.get("rows"), to=switch.get("to")))
    dropped = data.get("dropped")
    if dropped:
        flags.append(_flag("rows_dropped", "data", "warning", f"{dropped['rows']} {dropped['reason']} dropped",
                           rows=dropped["rows"], reason=dropped["reason"]))
    if data.get("skipped_lines"):
        flags.append(_flag("lines_skipped", "data", "warning",
                           f"{data['skipped_lines']} malformed results line(s) skipped",
                           rows=data["skipped_lines"]))
    regret, noise = fit.get("regret") or {}, (fit.get("noise") or {}).get("relative")
    if regret.get("mean") is not None and noise is not None and regret["mean"] > noise:
        flags.append(_flag("regret_above_noise", "data", "warning",
                           f"leave-one-cell-out regret {regret['mean']:.2%} (max {regret['max']:.2%}) is above "
                           f"the noise floor {noise:.2%}", mean=regret["mean"], max=regret["max"], noise=noise))
    return flags


def assess(fit: dict) -> dict:
    """The `quality` section of a FIT.json dict: `status`, per-law `laws` statuses, `flags` and `rules`."""
    n, d = _fitted_cells(fit)
    flags = []
    for key in ("lr", "batch_tokens"):
        law = fit["laws"][key]
        flags += _coef_flags(key, law["coef"], _EXPONENTS[key])
        flags.append(_prediction_flag(key, evaluate_law, law, n, d))
    if fit.get("loss_law"):
        flags += _loss_law_flags(fit["loss_law"], n, d)
    flags = [f for f in flags if f is not None] + _data_flags(fit)
    worst = lambda fs: max((SEVERITIES.index(f["severity"]) for f in fs), default=0)  # noqa: E731
    laws = {key: SEVERITIES[worst([f for f in flags if f["law"] == key])] for key in LAWS
            if key != "loss_law" or fit.get("loss_law")}
    return {
        "status": SEVERITIES[worst(flags)],
        "laws": laws,
        "flags": flags,
        "rules": {"e_floor": E_FLOOR, "exponent_bounds": list(EXPONENT_BOUNDS), "wide_span": WIDE_SPAN,
                  "zero_width": ZERO_WIDTH, "unusable_span": UNUSABLE_SPAN,
                  "unusable": "a loss law at a bound; an lr or batch prediction interval at a fitted cell "
                  f"spanning more than {UNUSABLE_SPAN:g}x"},
    }


def quality(fit: dict) -> dict:
    """The fit's recorded `quality`, or (a FIT.json written before it existed) one assessed now."""
    return fit.get("quality") or assess(fit)


def format_flags(flags: list[dict]) -> str:
    """All flags in one line: `[severity] code: message; ...`."""
    return "; ".join(f"[{f['severity']}] {f['code']}: {f['message']}" for f in flags)


def check_usable(fit: dict, uses=LAWS, force: bool = False, source: str = "the fit") -> str | None:
    """One warning line repeating the fit's flags (None when there are none); a UserError when a law in
    `uses` is flagged unusable and `force` is not set."""
    q = quality(fit)
    flags = q["flags"]
    bad = [key for key in uses if q["laws"].get(key) == "unusable"]
    if bad and not force:
        reasons = format_flags([f for f in flags if f["severity"] == "unusable" and f["law"] in bad])
        raise UserError(
            f"{source}: the {', '.join(_LAW_NAMES[b] for b in bad)} flagged unusable ({reasons}); refit "
            "(more cells or seeds; --no-loss-law drops the loss law) or pass --force to use it anyway"
        )
    if not flags:
        return None
    return f"fit quality {q['status']} ({source}): {format_flags(flags)}"


def interval_warning(result: dict) -> str | None:
    """A prediction's own intervals wider than WIDE_SPAN, in one line (None when all are narrower)."""
    parts = []
    for key in ("lr", "batch_tokens", "loss"):
        ci = result.get(f"{key}_ci")
        if ci and None not in ci and span(*ci) > WIDE_SPAN:
            parts.append(f"{key} interval [{ci[0]}, {ci[1]}] spans more than {WIDE_SPAN:g}x")
    return "wide_prediction here: " + "; ".join(parts) if parts else None
