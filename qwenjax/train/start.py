"""Where a run's first state comes from: a fresh init, or a previous stage (`model.init_from`).

`model.init_from` names either a model directory (`qwenjax.model_io`: `convert --from-hf` output, or a run's
`model/`, or `qwenjax export` output) or a run directory (its newest checkpoint). Only the parameters'
shapes must match: a stage may change anything that does not change them (rope_theta, seq_len, data,
schedule, batch size, ...).

`train.resume_optimizer` (run directories only):
- false (default): the new stage starts with fresh Adam moments; only the parameters carry over.
- true: the new stage keeps the previous stage's Adam state (first and second moments and optax's
  bias-correction count, so the moments are not re-estimated from zero).
Either way the train step counter, which drives the learning-rate schedule, restarts at 0: each stage has
its own warmup and decay over its own train.steps. (Resuming an interrupted run from its own checkpoint
is something else: it restores everything, step counter included.)

A reward model (`train.objective: reward`) from a language-model stage takes its backbone, drops its lm_head
and starts its score head at zeros (qwenjax.train.reward.from_lm), with fresh Adam moments.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from qwenjax import model_io
from qwenjax.config import ModelConfig
from qwenjax.errors import UserError
from qwenjax.run_config import RunConfig
from qwenjax.train import optim, reward, sharding
from qwenjax.train.run_dir import checkpoint_steps, model_dir_of, restore_run_state, run_model_config
from qwenjax.train.step import State, abstract_state, init_state_sharded


def initial_state(cfg: RunConfig, model_cfg: ModelConfig, rng, mesh, state_sh) -> State:
    """The state of step 0: fresh, or from `model.init_from` (see the module docstring)."""
    if not cfg.model.init_from:
        if cfg.train.resume_optimizer:
            raise UserError("train.resume_optimizer: true needs model.init_from (a run directory)")
        return init_state_sharded(model_cfg, rng, mesh)
    source = Path(cfg.model.init_from).expanduser()
    keep_opt = cfg.train.resume_optimizer
    if model_cfg.num_labels is not None and _source_labels(source) is None:  # an LM stage -> a reward model
        if keep_opt:
            raise UserError(f"train.resume_optimizer: true cannot carry a language model's Adam state ("
                            f"{source}) into a reward model; set it to false")
        lm_cfg = model_cfg.replace(num_labels=None)
        lm_sh = sharding.state_shardings(abstract_state(lm_cfg), mesh, lm_cfg)
        lm = initial_state(cfg, lm_cfg, rng, mesh, lm_sh)["params"]
        params = jax.device_put(reward.from_lm(lm, model_cfg), state_sh["params"])
        opt_state = jax.jit(optim.init_opt_state, out_shardings=state_sh["opt_state"])(params)
        return {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.zeros((), jnp.int32),
                                                                                  state_sh["step"])}
    if (source / "config.yaml").is_file() and checkpoint_steps(source):
        _, saved, _ = restore_run_state(source, lambda abstract: state_sh,
                                        expect=lambda c: _check_shapes(cfg, model_cfg, c))
        params, opt_state = saved["params"], saved["opt_state"] if keep_opt else None
    elif model_io.is_model_dir(source) or model_io.is_model_dir(model_dir_of(source)):
        if keep_opt:
            raise UserError(f"train.resume_optimizer: true needs model.init_from to be a run directory with a "
                            f"checkpoint; {source} holds parameters only")
        folder = source if model_io.is_model_dir(source) else model_dir_of(source)
        loaded_cfg = model_io.load_config(folder).replace(scan_layers=model_cfg.scanned)  # the run's layout
        _check_shapes(cfg, model_cfg, loaded_cfg)
        _, params = model_io.load_model(folder, shardings=state_sh["params"], scan_layers=model_cfg.scanned)
        opt_state = None
    elif (source / "config.yaml").is_file():
        raise UserError(f"model.init_from {source}: this run directory holds no checkpoint and no model/ "
                        "(not trained yet, or trained with checkpoint.enabled: false)")
    else:
        raise UserError(f"model.init_from {source}: neither a model directory ({model_io.CONFIG_FILE}) nor a "
                        "run directory (config.yaml + ckpt/)")
    want = abstract_state(model_cfg)["params"]
    params = jax.tree.map(lambda x, w: x.astype(w.dtype), params, want)
    if opt_state is None:
        opt_state = jax.jit(optim.init_opt_state, out_shardings=state_sh["opt_state"])(params)
    step0 = jax.device_put(jnp.zeros((), jnp.int32), state_sh["step"])
    return {"params": params, "opt_state": opt_state, "step": step0}


def _source_labels(source: Path) -> int | None:
    """The `num_labels` of the model `model.init_from` names (None: a language model, or unreadable here)."""
    try:
        if model_io.is_model_dir(source):
            return model_io.load_config(source).num_labels
        if (source / "config.yaml").is_file():
            return run_model_config(source).num_labels
    except UserError:
        return None  # initial_state's own checks name the problem
    return None


def _check_shapes(cfg: RunConfig, model_cfg: ModelConfig, loaded_cfg: ModelConfig) -> None:
    def shapes(c):
        return [(jax.tree_util.keystr(p), x.shape)
                for p, x in jax.tree_util.tree_leaves_with_path(abstract_state(c)["params"])]

    if shapes(model_cfg) != shapes(loaded_cfg):
        raise UserError(f"model.init_from {cfg.model.init_from}: its parameters do not match the configured "
                        f"model (checkpoint hidden_size={loaded_cfg.hidden_size}, "
                        f"layers={loaded_cfg.num_hidden_layers}, vocab={loaded_cfg.vocab_size})")
