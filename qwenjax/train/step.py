"""The train step: pure, then jitted with explicit shardings and donated state, solo or stacked.

Pure, jit/vmap-able pieces (what populations of learning rates map over `(state, hp)`):

    init_train_state(model_cfg, rng) -> state = {"params", "opt_state", "step"} (+ "ref_params" when the
        objective declares a frozen reference model; never checkpointed, never updated)
    make_hparams(run_cfg) -> hp = optimizer hyperparameters + the objective's (float32 scalars)
    train_step(state, batch, hp, *, model_cfg, optim_static, objective, grad_accum)
        -> (state, {the objective's metrics, "grad_norm", "lr"})
    eval_step(params, batch, *, model_cfg) -> (sum of token losses, number of tokens)

Jitted forms: `compiled_train_step` (one run, sharded over a mesh, state donated) and `population_step`
(a stack of runs on one device). Both take a `StepStatic`: everything about a step that changes the program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from qwenjax import model as qmodel
from qwenjax.config import ModelConfig
from qwenjax.run_config import RunConfig
from qwenjax.train import optim, sharding
from qwenjax.train.checkpoint import abstract_with_shardings
from qwenjax.train.compile import cached
from qwenjax.train.objectives import NEXT_TOKEN, TOKEN_BATCH, mean_metrics
from qwenjax.train.optim import OptimStatic

State = dict[str, Any]
BATCH_DTYPES = TOKEN_BATCH
#: ways to apply one step to a stack of population members (see `population_step`)
STRATEGIES = ("map", "vmap", "unroll")


@dataclasses.dataclass(frozen=True)
class StepStatic:
    """What changes the compiled step besides shapes (hashable: part of the compile-cache key)."""

    optim: OptimStatic = OptimStatic()
    objective: Any = NEXT_TOKEN
    grad_accum: int = 1  # micro-batches per step
    attention_impl: str = "auto"  # a kernel of qwenjax.attention (the run config's attention.impl)
    remat: str = "none"  # a jax.checkpoint policy of the layer body (the run config's train.remat)


# ---------------------------------------------------------------------------------------------------------
# Pure functions


def init_train_state(model_cfg: ModelConfig, rng) -> State:
    """Fresh parameters, zero Adam moments and step 0 (float32 master weights when param_dtype is)."""
    params = qmodel.init_params(model_cfg, rng)
    return {"params": params, "opt_state": optim.init_opt_state(params), "step": jnp.zeros((), jnp.int32)}


def checkpointed(state: State) -> State:
    """The part of a train state that checkpoints hold: the frozen reference (if any) is reloaded from its
    source on resume, not saved with every checkpoint."""
    return {k: v for k, v in state.items() if k != "ref_params"}


def make_optim_static(run_cfg: RunConfig) -> OptimStatic:
    return OptimStatic(schedule=run_cfg.optim.schedule, decay_embeddings=run_cfg.optim.decay_embeddings,
                       decay_shape=run_cfg.optim.decay_shape)


def make_step_static(run_cfg: RunConfig, objective=NEXT_TOKEN) -> StepStatic:
    return StepStatic(optim=make_optim_static(run_cfg), objective=objective, grad_accum=run_cfg.train.grad_accum,
                      attention_impl=run_cfg.attention.kernel, remat=run_cfg.train.remat)


def make_hparams(run_cfg: RunConfig, objective=NEXT_TOKEN) -> dict[str, jax.Array]:
    """The traced hyperparameters of a run: the optimizer's (qwenjax.train.optim.HP_KEYS) and the
    objective's (next-token loss: z_loss, from `optim.z_loss`), all float32 scalars."""
    o = run_cfg.optim
    hp = optim.make_hp(lr=o.lr, warmup_steps=o.warmup_steps, total_steps=run_cfg.train.steps,
                       min_lr_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction,
                       weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm)
    return {**hp, **objective.make_hp(run_cfg)}


def train_step(state: State, batch, hp, *, model_cfg: ModelConfig, optim_static: OptimStatic,
               objective=NEXT_TOKEN, grad_accum: int = 1, attention_impl: str = "auto", remat: str = "none"):
    """One optimizer step on a global batch of [B, T] arrays. Pure: jit it with shardings, or map it over
    (state, hp) for a population of learning rates. Returns (new state, {metrics, "grad_norm", "lr"}).
    `remat` travels to the model inside its config (a runtime field: the params do not depend on it)."""
    model_cfg = model_cfg.replace(remat=remat)
    ref = state.get("ref_params")
    grads, metrics = mean_metrics(state["params"], batch, hp, model_cfg=model_cfg, grad_accum=grad_accum,
                                  objective=objective, ref_params=ref, attention_impl=attention_impl)
    params, opt_state, grad_norm, lr = optim.apply_updates(state["params"], grads, state["opt_state"],
                                                           state["step"], hp, optim_static)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    if ref is not None:
        new_state["ref_params"] = ref
    return new_state, {**metrics, "grad_norm": grad_norm, "lr": lr}


def eval_step(params, batch, *, model_cfg: ModelConfig, objective=NEXT_TOKEN, attention_impl: str = "auto"):
    """(sum of held-out losses, their count) of one held-out batch."""
    return objective.eval_sums(params, batch, model_cfg, attention_impl)


def static_step(static: StepStatic, model_cfg: ModelConfig):
    """`train_step` with everything static bound: (state, batch, hp) -> (state, metrics)."""
    return functools.partial(train_step, model_cfg=model_cfg, optim_static=static.optim,
                             objective=static.objective, grad_accum=static.grad_accum,
                             attention_impl=static.attention_impl, remat=static.remat)


# ---------------------------------------------------------------------------------------------------------
# Shapes


@functools.lru_cache(maxsize=16)
def abstract_state(model_cfg: ModelConfig):
    """Shapes and dtypes of the (checkpointed) train state (ShapeDtypeStruct leaves; traced once per config)."""
    return jax.eval_shape(functools.partial(init_train_state, model_cfg), jax.random.key(0))


def abstract_batch(batch_size: int, seq_len: int, shard=None, objective=NEXT_TOKEN) -> dict:
    dtypes = dict(getattr(objective, "batch_dtypes", None) or TOKEN_BATCH)  # an objective's own schema (DPO)
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtypes[k], sharding=shard)
            for k in objective.batch_keys}


def _abstract_hp(objective, shard):
    hp = {**optim.make_hp(lr=1.0, warmup_steps=0, total_steps=1), **objective.make_hp()}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard), hp)


# ---------------------------------------------------------------------------------------------------------
# Jitted with shardings


def compiled_train_step(model_cfg: ModelConfig, static: StepStatic, mesh, batch_size: int, seq_len: int):
    """(compiled step, seconds spent compiling now: 0 when cached). Signature: (state, batch, hp); the
    state is donated, the batch split over the data-parallel axes, hp replicated."""
    def build():
        abstract = abstract_state(model_cfg)
        state_sh = sharding.state_shardings(abstract, mesh, model_cfg)
        if static.objective.needs_reference:
            abstract = {**abstract, "ref_params": abstract["params"]}
            state_sh = {**state_sh, "ref_params": state_sh["params"]}
        rep = sharding.replicated(mesh)
        batch_sh = sharding.batch_sharding(mesh)
        fn = jax.jit(static_step(static, model_cfg), in_shardings=(state_sh, batch_sh, rep),
                     out_shardings=(state_sh, rep), donate_argnums=(0,))
        with sharding.activation_sharding(mesh, model_cfg):
            lowered = fn.lower(abstract_with_shardings(abstract, state_sh),
                               abstract_batch(batch_size, seq_len, batch_sh, static.objective),
                               _abstract_hp(static.objective, rep))
        return lowered.compile()

    return cached(("train", model_cfg, static, mesh, batch_size, seq_len), build)


def compiled_eval_step(model_cfg: ModelConfig, mesh, batch_size: int, seq_len: int, objective=NEXT_TOKEN,
                       attention_impl: str = "auto"):
    """(compiled held-out step, seconds spent compiling now). Signature: (params, batch) -> (sum, count)."""
    def build():
        abstract = abstract_state(model_cfg)["params"]
        param_sh = sharding.state_shardings(abstract, mesh, model_cfg)
        batch_sh = sharding.batch_sharding(mesh)
        fn = jax.jit(functools.partial(eval_step, model_cfg=model_cfg, objective=objective,
                                       attention_impl=attention_impl),
                     in_shardings=(param_sh, batch_sh), out_shardings=sharding.replicated(mesh))
        with sharding.activation_sharding(mesh, model_cfg):
            lowered = fn.lower(abstract_with_shardings(abstract, param_sh),
                               abstract_batch(batch_size, seq_len, batch_sh, objective))
        return lowered.compile()

    return cached(("eval", model_cfg, mesh, batch_size, seq_len, objective, attention_impl), build)


def init_state_sharded(model_cfg: ModelConfig, rng, mesh) -> State:
    """The train state created directly on its shardings (no full copy on one device first)."""
    def build():
        state_sh = sharding.state_shardings(abstract_state(model_cfg), mesh, model_cfg)
        return jax.jit(functools.partial(init_train_state, model_cfg), out_shardings=state_sh)

    return cached(("init", model_cfg, mesh), build)[0](rng)


# ---------------------------------------------------------------------------------------------------------
# Stacked: a population of runs that differ only in traced hyperparameters


def stack(trees):
    """One tree whose leaves have a leading population axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def population_step(model_cfg: ModelConfig, static: StepStatic, strategy: str, members: int):
    """jit((states, batch, hps, alive) -> (states, metrics)) over a stack of `members` train states, on the
    same batch. A member with alive == False keeps its state (a diverged member is frozen).

    `map`: `lax.map` over the members inside one program (the same 2-D matmuls as a solo run, so a member
    equals its solo run bit for bit); `vmap`: batched matmuls (suits accelerators; slow on XLA:CPU);
    `unroll`: the members' steps written side by side (XLA may run them concurrently; P times the code)."""
    def build():
        step = static_step(static, model_cfg)
        names = (*static.objective.metrics, "grad_norm", "lr")

        def frozen(state):
            return state, {k: jnp.zeros((), jnp.float32) for k in names}

        def one(state, batch, hp, alive):
            return jax.lax.cond(alive, lambda s: step(s, batch, hp), frozen, state)

        if strategy == "vmap":
            def f(states, batch, hps, alive):
                new, metrics = jax.vmap(step, in_axes=(0, None, 0))(states, batch, hps)
                keep = lambda n, o: jnp.where(alive.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
                return jax.tree.map(keep, new, states), metrics
        elif strategy == "map":
            def f(states, batch, hps, alive):
                return jax.lax.map(lambda x: one(x[0], batch, x[1], x[2]), (states, hps, alive))
        elif strategy == "unroll":
            def f(states, batch, hps, alive):
                pick = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
                return stack([one(pick(states, i), batch, pick(hps, i), alive[i]) for i in range(members)])
        else:
            raise ValueError(f"unknown population strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
        return jax.jit(f, donate_argnums=(0,))

    return cached(("population", model_cfg, static, strategy, members), build)[0]

