"""The pure train/eval steps and their jitted forms with explicit shardings and donated state.

Pure, jit/vmap-able pieces (what the sweep's learning-rate populations vmap over `(state, hp)`):

    init_train_state(model_cfg, rng) -> state = {"params", "opt_state", "step"}
    make_hparams(run_cfg) -> hp = {"lr", "warmup_steps", "total_steps", ...: float32 scalars}
    train_step(state, batch, hp, *, model_cfg, optim_static) -> (state, {"loss", "grad_norm", "lr"})
    eval_step(params, batch, *, model_cfg) -> (sum of token losses, number of tokens)
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from qwenjax import model as qmodel
from qwenjax.config import ModelConfig
from qwenjax.run_config import RunConfig
from qwenjax.train import optim, sharding
from qwenjax.train.checkpoint import abstract_with_shardings
from qwenjax.train.compile import _COMPILED, _remember
from qwenjax.train.objectives import loss_terms, mean_gradients
from qwenjax.train.optim import OptimStatic

State = dict[str, Any]
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
                "loss_mask": jnp.float32}


# ---------------------------------------------------------------------------------------------------------
# Pure functions


def init_train_state(model_cfg: ModelConfig, rng) -> State:
    """Fresh parameters, zero Adam moments and step 0 (float32 master weights when param_dtype is)."""
    params = qmodel.init_params(model_cfg, rng)
    return {"params": params, "opt_state": optim.init_opt_state(params), "step": jnp.zeros((), jnp.int32)}


def make_hparams(run_cfg: RunConfig) -> dict[str, jax.Array]:
    """The traced hyperparameters of a run (float32 scalars; see qwenjax.train.optim.HP_KEYS)."""
    o = run_cfg.optim
    return optim.make_hp(lr=o.lr, warmup_steps=o.warmup_steps, total_steps=run_cfg.train.steps,
                         min_lr_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction,
                         weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm,
                         z_loss=o.z_loss)


def make_optim_static(run_cfg: RunConfig) -> OptimStatic:
    return OptimStatic(schedule=run_cfg.optim.schedule, grad_accum=run_cfg.train.grad_accum,
                       decay_embeddings=run_cfg.optim.decay_embeddings, decay_shape=run_cfg.optim.decay_shape)


def train_step(state: State, batch, hp, *, model_cfg: ModelConfig, optim_static: OptimStatic):
    """One optimizer step on a global batch of [B, T] arrays. Pure: jit it with shardings, or vmap it over
    (state, hp) for a population of learning rates. Returns (new state, {"loss", "grad_norm", "lr"})."""
    grads, loss = mean_gradients(state["params"], batch, hp, model_cfg=model_cfg,
                                 grad_accum=optim_static.grad_accum)
    params, opt_state, grad_norm, lr = optim.apply_updates(state["params"], grads, state["opt_state"],
                                                           state["step"], hp, optim_static)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": lr}


def eval_step(params, batch, *, model_cfg: ModelConfig):
    """(sum of token losses, token count) of one held-out batch."""
    nll, _, count = loss_terms(params, batch, model_cfg)
    return nll, count



@functools.lru_cache(maxsize=16)
def abstract_state(model_cfg: ModelConfig):
    """Shapes and dtypes of the train state (jax.ShapeDtypeStruct leaves; traced once per config)."""
    return jax.eval_shape(functools.partial(init_train_state, model_cfg), jax.random.key(0))


def _abstract_batch(batch_size: int, seq_len: int, shard) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=shard)
            for k, dtype in BATCH_DTYPES.items()}



def compiled_train_step(model_cfg: ModelConfig, static: OptimStatic, mesh, batch_size: int, seq_len: int):
    """(compiled step, seconds spent compiling now: 0 when cached). Signature: (state, batch, hp)."""
    key = ("train", model_cfg, static, mesh, batch_size, seq_len)
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    abstract = abstract_state(model_cfg)
    state_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    rep = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    fn = jax.jit(functools.partial(train_step, model_cfg=model_cfg, optim_static=static),
                 in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep), donate_argnums=(0,))
    abstract_sh = abstract_with_shardings(abstract, state_sh)
    hp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                      optim.make_hp(lr=1.0, warmup_steps=0, total_steps=1))
    t0 = time.perf_counter()
    lowered = fn.lower(abstract_sh, _abstract_batch(batch_size, seq_len, batch_sh), hp)
    compiled = _remember(key, lowered.compile())
    return compiled, time.perf_counter() - t0


def compiled_eval_step(model_cfg: ModelConfig, mesh, batch_size: int, seq_len: int):
    key = ("eval", model_cfg, mesh, batch_size, seq_len)
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    abstract = abstract_state(model_cfg)["params"]
    param_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    rep = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    fn = jax.jit(functools.partial(eval_step, model_cfg=model_cfg), in_shardings=(param_sh, batch_sh),
                 out_shardings=rep)
    abstract_sh = abstract_with_shardings(abstract, param_sh)
    t0 = time.perf_counter()
    compiled = _remember(key, fn.lower(abstract_sh, _abstract_batch(batch_size, seq_len, batch_sh)).compile())
    return compiled, time.perf_counter() - t0


def init_state_sharded(model_cfg: ModelConfig, rng, mesh) -> State:
    """The train state created directly on its shardings (no full copy on one device first)."""
    abstract = abstract_state(model_cfg)
    state_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    key = ("init", model_cfg, mesh)
    init = _COMPILED.get(key) or _remember(
        key, jax.jit(functools.partial(init_train_state, model_cfg), out_shardings=state_sh))
    return init(rng)
