"""Training: one run (or a population of learning rates) from a run config to a run directory.

Parts (see docs/architecture.md): `step` (the pure step, its jitted sharded and stacked forms),
`objectives` (what is minimised: batch schema, hyperparameters, metrics), `loop` (the one loop, solo or
population), `start` (fresh init or a previous stage), `run_dir` (what a run directory holds, export),
`compile` (executable caches), `optim`, `checkpoint`, `metrics`, `sharding`.
`from qwenjax.train import train` is the entry point; the names below are what callers use.
"""

from qwenjax.data.prepare import prepare_data
from qwenjax.train.loop import train, train_population
from qwenjax.train.objectives import NEXT_TOKEN, mean_gradients
from qwenjax.train.run_dir import export_model, fork_steps
from qwenjax.train.step import abstract_state, eval_step, init_train_state, make_hparams, make_optim_static, train_step

__all__ = ["NEXT_TOKEN", "abstract_state", "eval_step", "export_model", "fork_steps", "init_train_state",
           "make_hparams", "make_optim_static", "mean_gradients", "prepare_data", "train", "train_population",
           "train_step"]
