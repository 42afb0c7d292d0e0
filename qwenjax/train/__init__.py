"""Training: one run (or a population of learning rates) from a run config to a run directory.

Parts: `step` (pure steps, their jitted sharded forms), `objectives` (what is minimised), `loop` (the run),
`compile` (executable caches), `run_dir` (what a run directory holds), `optim`, `checkpoint`, `metrics`,
`sharding`. `from qwenjax.train import train` is the entry point.
"""

from qwenjax.train.data_setup import DataSetup, ensure_tokenizer, prepare_data
from qwenjax.train.fit_bridge import HPARAM_KEYS, apply_hparams
from qwenjax.train.loop import heldout_loss, train
from qwenjax.train.objectives import loss_terms, mean_gradients
from qwenjax.train.run_dir import fork_steps, step_events
from qwenjax.train.step import (
    BATCH_DTYPES,
    State,
    abstract_state,
    compiled_eval_step,
    compiled_train_step,
    eval_step,
    init_state_sharded,
    init_train_state,
    make_hparams,
    make_optim_static,
    train_step,
)

__all__ = [
    "BATCH_DTYPES", "HPARAM_KEYS", "DataSetup", "State", "abstract_state", "apply_hparams", "compiled_eval_step",
    "compiled_train_step", "ensure_tokenizer", "eval_step", "fork_steps", "heldout_loss", "init_state_sharded",
    "init_train_state", "loss_terms", "make_hparams", "make_optim_static", "mean_gradients", "prepare_data",
    "step_events", "train", "train_step",
]
