"""Scaling laws from sweep results: optimal lr and batch size in (N, D), the loss law, predictions, plots,
the seed-noise floor and held-out validation.

Pure numpy/scipy/pandas/matplotlib: nothing here imports JAX, training or sweeps (a preset's N is counted
from its shapes by `qwenjax.config.param_counts`), so a notebook can fit laws where JAX is not even installed;
tests/test_scaling_nojax.py holds that. The method and FIT.json format are described in docs/scaling.md.
"""

from qwenjax.scaling.fitfile import FORMAT, format_law, load_fit, make_fit, save_fit
from qwenjax.scaling.holdout import holdout_validation
from qwenjax.scaling.hparams import DEFAULT_METHOD, ESTIMATORS, cell_optima, evaluate_law, fit_hparam_laws
from qwenjax.scaling.landscape import ladder_checks, ladder_message
from qwenjax.scaling.loss_law import compute_optimal, evaluate_loss_law, fit_loss_law
from qwenjax.scaling.noise import noise_floor
from qwenjax.scaling.plots import (
    make_plots,
    plot_batch_sweeps,
    plot_holdout,
    plot_hparam_laws,
    plot_loss_law,
    plot_lr_sweeps,
    plot_predictions,
)
from qwenjax.scaling.predict import QWEN25_PRESETS, QWEN25_TOKENS, predict, preset_n_params
from qwenjax.scaling.prior import STEP_LAW, parse_prior
from qwenjax.scaling.results import load_results
from qwenjax.scaling.units import format_count, parse_count

__all__ = [
    "DEFAULT_METHOD",
    "ESTIMATORS",
    "FORMAT",
    "QWEN25_PRESETS",
    "QWEN25_TOKENS",
    "STEP_LAW",
    "cell_optima",
    "compute_optimal",
    "evaluate_law",
    "evaluate_loss_law",
    "fit_hparam_laws",
    "fit_loss_law",
    "format_count",
    "format_law",
    "holdout_validation",
    "ladder_checks",
    "ladder_message",
    "load_fit",
    "load_results",
    "make_fit",
    "make_plots",
    "noise_floor",
    "parse_count",
    "parse_prior",
    "plot_batch_sweeps",
    "plot_hparam_laws",
    "plot_holdout",
    "plot_loss_law",
    "plot_lr_sweeps",
    "plot_predictions",
    "predict",
    "preset_n_params",
    "save_fit",
]
