"""Training: one run (or a population of learning rates) from a run config to a run directory.

Parts (see docs/architecture.md): `step` (the pure step, its jitted sharded and stacked forms),
`objectives` (what is minimised: batch schema, hyperparameters, metrics), `loop` (the one loop, solo or
population), `start` (fresh init or a previous stage), `run_dir` (what a run directory holds, export),
`compile` (executable caches), `optim`, `checkpoint`, `metrics`, `sharding`.
`from qwenjax.train import train` is the entry point.
"""

from qwenjax.data.prepare import prepare_data
from qwenjax.train.loop import heldout_loss, train, train_population
from qwenjax.train.objectives import NEXT_TOKEN, NextTokenLoss, loss_terms, mean_gradients
from qwenjax.train.run_dir import export_model, fork_steps, step_events
from qwenjax.train.step import (
    BATCH_DTYPES,
    State,
    StepStatic,
    abstract_state,
    compiled_eval_step,
    compiled_train_step,
    eval_step,
    init_state_sharded,
    init_train_state,
    make_hparams,
    make_optim_static,
    make_step_static,
    population_step,
    train_step,
)

__all__ = [
    "BATCH_DTYPES", "NEXT_TOKEN", "NextTokenLoss", "State", "StepStatic", "abstract_state", "compiled_eval_step",
    "compiled_train_step", "eval_step", "export_model", "fork_steps", "heldout_loss", "init_state_sharded",
    "init_train_state", "loss_terms", "make_hparams", "make_optim_static", "make_step_static", "mean_gradients",
    "population_step", "prepare_data", "step_events", "train", "train_population", "train_step",
]
