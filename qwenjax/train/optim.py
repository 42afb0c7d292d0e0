"""AdamW with traced hyperparameters, global-norm clipping and warmup + cosine / WSD / constant schedules.

Why traced: a learning-rate sweep runs many configurations of equal shapes. Every number that only scales
the update (peak lr, warmup, total steps, floor, weight decay, Adam betas and eps, clip norm) is a
float32 scalar in the dict `hp`, an ARGUMENT of the jitted step, so all those runs share one compiled step
and a population of learning rates can be `jax.vmap`ped over `(state, hp)`. Only what changes the program
is static (`OptimStatic`: the schedule kind and WSD decay shape, which parameters are decayed). What is
minimised (and its z-loss) and the number of micro-batches belong to the step, not to the optimizer
(`qwenjax.train.objectives`, `qwenjax.train.step.StepStatic`).

The update (decoupled weight decay, as AdamW):
    g   = clip(grad, clip_norm)                      (global norm; clip_norm 0 = off)
    u   = adam(g; b1, b2, eps)                       (optax.scale_by_adam, bias-corrected)
    p  <- p - lr(step) * (u + weight_decay * mask * p)
Master weights and the Adam moments are float32; the model computes in `model.dtype`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwenjax.errors import UserError
from qwenjax.model import is_stacked_path
from qwenjax.run_config import DECAY_SHAPES, SCHEDULES

HP_KEYS = ("lr", "warmup_steps", "total_steps", "min_lr_ratio", "decay_fraction", "weight_decay",
           "b1", "b2", "eps", "clip_norm")


@dataclasses.dataclass(frozen=True)
class OptimStatic:
    """The parts of the optimizer that change the compiled program (hashable: a static jit argument)."""

    schedule: str = "cosine"  # cosine | wsd | constant
    decay_embeddings: bool = False  # decay embed_tokens too (norms and biases never)
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r} ({', '.join(SCHEDULES)})")
        if self.decay_shape not in DECAY_SHAPES:
            raise UserError(f"unknown decay shape {self.decay_shape!r} ({', '.join(DECAY_SHAPES)})")


def make_hp(*, lr: float, warmup_steps: float, total_steps: float, min_lr_ratio: float = 0.1,
            decay_fraction: float = 0.2, weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
            eps: float = 1e-8, clip_norm: float = 1.0) -> dict[str, jax.Array]:
    """The traced hyperparameters as float32 scalars (stack several with `jax.tree.map(jnp.stack, ...)`)."""
    values = dict(lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio,
                  decay_fraction=decay_fraction, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
                  clip_norm=clip_norm)
    return {k: jnp.asarray(values[k], jnp.float32) for k in HP_KEYS}


def learning_rate(step, hp, schedule: str, decay_shape: str = "linear") -> jax.Array:
    """lr at 0-based `step`: linear warmup to hp['lr'] over warmup_steps (step 0 already gets lr/warmup),
    then cosine or WSD (constant, then a decay over the last decay_fraction of the steps) down to
    min_lr_ratio x lr at the last step, or constant.

    WSD decay shapes, with progress p in [0, 1] over the decay and floor = min_lr_ratio:
    `linear` 1 - (1 - floor) p; `1-sqrt` (Hägele et al. 2024) floor + (1 - floor)(1 - sqrt(p)), written
    1 - (1 - floor) sqrt(p) so that both give exactly 1 before the decay (the stable phase of every token
    budget is then bit-identical, which cooldown forks rely on)."""
    step = jnp.asarray(step, jnp.float32)
    warmup, total, floor = hp["warmup_steps"], hp["total_steps"], hp["min_lr_ratio"]
    warm = jnp.where(warmup > 0, jnp.minimum(1.0, (step + 1.0) / jnp.maximum(warmup, 1.0)), 1.0)
    last = jnp.maximum(total - 1.0, 1.0)  # the final step gets exactly the floor
    if schedule == "cosine":
        span = jnp.maximum(last - warmup, 1.0)
        progress = jnp.clip((step - warmup) / span, 0.0, 1.0)
        decay = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif schedule == "wsd":
        start = jnp.maximum(jnp.floor(total * (1.0 - hp["decay_fraction"])), warmup)
        progress = jnp.clip((step - start) / jnp.maximum(last - start, 1.0), 0.0, 1.0)
        if decay_shape == "1-sqrt":
            progress = jnp.sqrt(progress)
        elif decay_shape != "linear":
            raise ValueError(f"unknown decay shape {decay_shape!r}")
        decay = 1.0 - (1.0 - floor) * progress
    elif schedule == "constant":
        decay = jnp.ones_like(step)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return hp["lr"] * warm * decay


def wsd_decay_start(total_steps: int, decay_fraction: float, warmup_steps: float) -> int:
    """The step at which WSD's decay starts (progress 0 there, lower lr from the next step on), in NumPy
    float32 exactly as `learning_rate` computes it in the step: cooldown forks are placed with it.

    Steps before it get the same lr under any longer total_steps (same warmup, lr and floor), so a longer
    run's state after `start` steps is this run's state after `start` steps: a fork of the longer run can
    train this run's remaining steps (its cooldown) instead of the whole run."""
    f32 = np.float32
    start = np.floor(f32(total_steps) * (f32(1.0) - f32(decay_fraction)))
    return int(max(start, f32(warmup_steps)))


def adam() -> optax.GradientTransformation:
    """The transformation whose state is created by `init_opt_state` (betas are replaced per step)."""
    return optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8)


def init_opt_state(params):
    return adam().init(params)


def decay_mask(params, static: OptimStatic):
    """True for parameters that get weight decay: matrices, not norms or biases (1-D), and not the token
    embedding unless `decay_embeddings` (a tied embedding is also the unembedding)."""

    def decays(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "embed_tokens":
            return static.decay_embeddings
        return x.ndim - is_stacked_path(tuple(getattr(k, "key", k) for k in path)) >= 2  # per layer

    return jax.tree_util.tree_map_with_path(decays, params)


def apply_updates(params, grads, opt_state, step, hp, static: OptimStatic):
    """One AdamW step. Returns (new params, new opt_state, grad_norm before clipping, lr)."""
    grad_norm = optax.global_norm(grads)
    clip = hp["clip_norm"]
    scale = jnp.where((clip > 0) & (grad_norm > clip), clip / jnp.maximum(grad_norm, 1e-30), 1.0)
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    tx = optax.scale_by_adam(b1=hp["b1"], b2=hp["b2"], eps=hp["eps"])
    updates, opt_state = tx.update(grads, opt_state, params)
    lr = learning_rate(step, hp, static.schedule, static.decay_shape)
    mask = decay_mask(params, static)

    def new_param(p, u, m):
        delta = u + hp["weight_decay"] * p if m else u
        return (p - lr * delta).astype(p.dtype)

    params = jax.tree.map(new_param, params, updates, mask)
    return params, opt_state, grad_norm, lr
