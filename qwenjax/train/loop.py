"""The training loop and its pure parts.

Pure, jit/vmap-able pieces (what the sweep's learning-rate populations vmap over `(state, hp)`):

    init_train_state(model_cfg, rng) -> state = {"params", "opt_state", "step"}
    make_hparams(run_cfg) -> hp = {"lr", "warmup_steps", "total_steps", ...: float32 scalars}
    train_step(state, batch, hp, *, model_cfg, optim_static) -> (state, {"loss", "grad_norm", "lr"})
    eval_step(params, batch, *, model_cfg) -> (sum of token losses, number of tokens)

`train(run_cfg) -> summary` is the whole run: data (tokenised once into the shared on-disk cache), mesh
and shardings, state created directly sharded (eval_shape + jit(out_shardings)) or restored from the
newest checkpoint in the run directory, the jitted step with donated state, logging, eval, checkpoints,
divergence detection, and `summary.json`. It runs unchanged on one CPU, a multi-GPU host or a TPU pod
(every process runs it; each feeds its own rows of the global batch).

Loss: mean next-token cross-entropy over the tokens with loss_mask 1 (in float32), optionally plus
z_loss x mean(logsumexp(logits)^2). With grad_accum k, the batch's rows are split into k micro-batches
(row r goes to micro-batch r mod k) whose summed gradients are divided by the total token count, so k
micro-batches equal one k-times-larger batch.
"""


from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import model as qmodel
from qwenjax.config import ModelConfig, flops_per_token
from qwenjax.errors import UserError
from qwenjax.run_config import RunConfig, atomic_write_text, missing_keys, model_config, planned_tokens, save_config
from qwenjax.train import optim, sharding
from qwenjax.train.checkpoint import Checkpointer, abstract_with_shardings
from qwenjax.train.compile import _setup_compilation_cache
from qwenjax.train.data_setup import prepare_data
from qwenjax.train.run_dir import _finished_summary, _write_fork, fork_steps, step_events
from qwenjax.train.step import (
    State,
    abstract_state,
    compiled_eval_step,
    compiled_train_step,
    init_state_sharded,
    make_hparams,
    make_optim_static,
)

log = logging.getLogger(__name__)


def heldout_loss(eval_fn, params, eval_sets, weights) -> tuple[float, dict[str, float]]:
    """(weighted mean held-out loss per token over the sources, per-source losses when there are several)."""
    losses = []
    for batches in eval_sets:
        sums = [eval_fn(params, b) for b in batches]
        nll, count = (float(sum(x)) for x in zip(*jax.device_get(sums), strict=True))
        losses.append(nll / max(count, 1.0))
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    per_source = {f"eval_loss_{i}": v for i, v in enumerate(losses)} if len(losses) > 1 else {}
    return float(np.dot(w, losses)), per_source


def _mean_last(values: list[float], fraction: float = 0.1) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    n = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(values[-n:]))


def train(cfg: RunConfig, forks: Sequence[RunConfig] = ()) -> dict[str, Any]:
    """Run (or resume, or return the summary of an already finished identical run) and return the summary.

    Divergence (a non-finite loss, or a loss above train.divergence_factor x the first step's) stops the run
    early with `diverged: true` in the summary; it is a result, not an error.

    `forks`: configs of shorter WSD runs that differ from this one only in train.steps and run_dir. When this
    run reaches a fork's decay start (`fork_steps`), it writes its complete state there (checkpoint, metrics
    so far, config), so `train(fork)` resumes from it and trains only the fork's cooldown, bit-identical to
    training the fork from scratch. A fork that already has a checkpoint or a summary is left alone.
    """
    from qwenjax.data import make_eval_batches, make_train_iterator
    from qwenjax.train import metrics as qmetrics

    t_start = time.perf_counter()
    sharding.maybe_initialize_distributed()
    unset = missing_keys(cfg)
    if unset:
        raise UserError(f"{unset[0]} is not set (the config has ???); pass {unset[0]}=VALUE")
    forks_at = fork_steps(cfg, forks)
    run_dir = Path(cfg.run_dir).expanduser()
    done = _finished_summary(run_dir, cfg)
    if done is not None:
        log.info("%s already finished (summary.json); nothing to do", run_dir)
        return done
    is_main = jax.process_index() == 0

    # Mesh and data (all validation before anything is written to the run directory).
    mesh = sharding.mesh_from_config(cfg.mesh)
    B, T, k = cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum
    dp = sharding.data_parallel_size(mesh)
    if (B // k) % dp:
        raise UserError(f"train.batch_size ({B}) / train.grad_accum ({k}) = {B // k} is not divisible by the "
                        f"data-parallel size mesh.data x mesh.fsdp = {dp}")
    _setup_compilation_cache(cfg.data.resolved_cache_dir())
    data = prepare_data(cfg)
    model_cfg = model_config(cfg, vocab_size=data.vocab_size)
    if data.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {data.vocab_size} tokens but model.vocab_size is "
                        f"{model_cfg.vocab_size}")
    block, n_blocks = sharding.process_batch_block(mesh, B)
    train_iter = make_train_iterator(data.caches, data.weights, seq_len=T, global_batch_size=B, seed=cfg.seed,
                                     process_index=block, process_count=n_blocks)
    eval_bs = B // k
    e_block, e_blocks = sharding.process_batch_block(mesh, eval_bs)
    eval_sets = [[sharding.global_batch(b, mesh, eval_bs) for b in make_eval_batches(
        c, seq_len=T, batch_size=eval_bs, num_batches=cfg.eval.num_batches(eval_bs), process_index=e_block,
        process_count=e_blocks)] for c in data.caches]

    n_total, n_non_embedding = qmodel.count_params(model_cfg)
    fpt = flops_per_token(model_cfg, T)
    static = make_optim_static(cfg)
    hp = jax.device_put(make_hparams(cfg), sharding.replicated(mesh))
    abstract = abstract_state(model_cfg)
    state_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    rep = sharding.replicated(mesh)
    rng = jax.random.key(cfg.seed)
    # The key as a replicated global array (Orbax saves only global arrays in multi-process runs).
    rng_host = np.asarray(jax.random.key_data(rng))
    rng_data = jax.make_array_from_callback(rng_host.shape, rep, lambda index: rng_host[index])

    # Resume, or start fresh (or from model.init_from).
    ckpt = Checkpointer(run_dir / "ckpt", keep=cfg.checkpoint.keep) if cfg.checkpoint.enabled else None
    target = {"train": abstract_with_shardings(abstract, state_sh),
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
    restored = ckpt.restore(target) if ckpt is not None and ckpt.all_steps() else None
    meta: dict[str, Any] = {}
    if restored is not None:
        start_step, saved, meta = restored
        state = saved["train"]
        train_iter.set_state(meta["data"])
        log.info("resuming %s from step %d", run_dir, start_step)
    else:
        start_step = 0
        state = _initial_state(cfg, model_cfg, rng, mesh, state_sh)
    origin = {k: meta[k] for k in ("fork_of", "fork_step") if k in meta}  # a fork keeps saying it is one
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        records = qmetrics.truncate_metrics(run_dir / "metrics.jsonl", start_step)
    else:
        records = []

    peak, peak_source = qmetrics.peak_flops(mesh.devices.flat)
    step_fn, compile_train_s = compiled_train_step(model_cfg, static, mesh, B, T)
    eval_fn, compile_eval_s = compiled_eval_step(model_cfg, mesh, eval_bs, T)
    compile_s = float(meta.get("compile_s", 0.0)) + compile_train_s + compile_eval_s
    logger = qmetrics.MetricsLogger(run_dir, total_steps=cfg.train.steps, start_step=start_step,
                                    enabled=is_main)
    logger.message(
        f"{run_dir}: N = {n_non_embedding:,} non-embedding params ({n_total:,} total), "
        f"D = {planned_tokens(cfg):,} tokens ({cfg.train.steps} steps x {B} x {T}), "
        f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices "
        f"({jax.process_count()} processes), compile {compile_train_s + compile_eval_s:.1f} s, "
        f"peak {peak / 1e9:,.1f} GFLOP/s ({peak_source})")

    def evaluate(params) -> tuple[float, dict[str, float]]:
        return heldout_loss(eval_fn, params, eval_sets, data.weights)

    def checkpoint_meta() -> dict[str, Any]:
        return {"data": train_iter.get_state(), "initial_loss": initial_loss,
                "wall_s": prior_wall + time.perf_counter() - t_start, "train_s": prior_train_s + train_s,
                "compile_s": compile_s, "step": step, **origin}

    def write_forks(fork_cfgs) -> float:
        """Hand this run's state after `step` steps to the forks that start here; returns the seconds taken."""
        t0 = time.perf_counter()
        fork_meta = {**checkpoint_meta(), "fork_of": str(run_dir), "fork_step": step}
        for fork in fork_cfgs:
            _write_fork(fork, step, {"train": state, "rng": rng_data}, fork_meta, records, is_main)
        return time.perf_counter() - t0

    initial_loss = meta.get("initial_loss")
    prior_wall = float(meta.get("wall_s", 0.0))
    prior_train_s = float(meta.get("train_s", 0.0))
    train_s = 0.0  # time in steps of this invocation (excluding eval and checkpoint saves)
    diverged, diverged_step, eval_loss = False, None, None
    step = start_step
    pending: list[tuple[int, dict]] = []
    mark_time, mark_step = time.perf_counter(), step

    try:
        while step < cfg.train.steps and not diverged:
            batch = sharding.global_batch(next(train_iter), mesh, B)
            state, step_metrics = step_fn(state, batch, hp)
            step += 1
            pending.append((step, step_metrics))
            do_eval, do_ckpt, fetch = step_events(cfg, step)
            forks_here = forks_at.get(step, ())
            if not (fetch or forks_here):
                continue
            fetched = jax.device_get([m for _, m in pending])
            now = time.perf_counter()
            record_step, values = pending[-1][0], fetched[-1]
            for (s, _), m in zip(pending, fetched, strict=True):
                loss = float(m["loss"])
                if initial_loss is None:
                    initial_loss = loss
                if not math.isfinite(loss) or loss > cfg.train.divergence_factor * initial_loss:
                    diverged, diverged_step, record_step, values = True, s, s, m
                    break
            if forks_here and not diverged and not fetch:  # between logged steps: hand over, log nothing
                mark_time += write_forks(forks_here)
                continue
            train_s += now - mark_time
            tokens_per_s = (step - mark_step) * B * T / max(now - mark_time, 1e-9)
            pending.clear()
            record = {"step": record_step, "loss": float(values["loss"]), "lr": float(values["lr"]),
                      "grad_norm": float(values["grad_norm"]), "tokens": record_step * B * T,
                      "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * fpt / peak}
            if diverged:
                logger.message(f"diverged at step {diverged_step}: loss {record['loss']:.4g} "
                               f"(initial {initial_loss:.4g}, limit x{cfg.train.divergence_factor})")
            elif do_eval:
                eval_loss, per_source = evaluate(state["params"])
                record.update(eval_loss=eval_loss, **per_source)
            records.append(record)
            logger.log(record)
            if forks_here and not diverged:  # before this run's own checkpoint: a resume never skips a fork
                write_forks(forks_here)
            if do_ckpt and not diverged:
                ckpt.save(step, {"train": state, "rng": rng_data}, checkpoint_meta())
            mark_time, mark_step = time.perf_counter(), step
        if not diverged and eval_loss is None:  # resumed at the very end: evaluate once more
            eval_loss, _ = evaluate(state["params"])
    finally:
        if ckpt is not None:
            ckpt.close()
        logger.close()
        close = getattr(train_iter, "close", None)
        if close:
            close()

    steps_done = diverged_step if diverged else step
    tokens = steps_done * B * T
    total_train_s = prior_train_s + train_s
    summary = {
        "run_dir": str(run_dir), "complete": True, "status": "diverged" if diverged else "ok",
        "n_params": n_non_embedding, "n_params_total": n_total,
        "tokens": tokens, "planned_tokens": planned_tokens(cfg),
        "steps": cfg.train.steps, "steps_completed": steps_done, "batch_size": B, "seq_len": T,
        "batch_tokens": B * T, "lr": cfg.optim.lr,
        "final_loss": _mean_last([r.get("loss") for r in records]),
        "eval_loss": None if diverged else eval_loss,
        "initial_loss": initial_loss, "diverged": diverged, "diverged_step": diverged_step,
        "wall_s": prior_wall + time.perf_counter() - t_start, "compile_s": compile_s,
        "flops": fpt * tokens, "flops_per_token": fpt,
        "tokens_per_s": tokens / total_train_s if total_train_s > 0 else None,
        "mfu": (tokens * fpt / total_train_s / peak) if total_train_s > 0 else None,
        "peak_flops": peak, "peak_flops_source": peak_source,
        "unigram_entropy": data.caches[0].unigram_entropy("heldout"),
        "vocab_size": model_cfg.vocab_size, "tokenizer": str(data.tokenizer_path),
        "schedule": cfg.optim.schedule, "warmup_steps": cfg.optim.warmup_steps,
        "weight_decay": cfg.optim.weight_decay, "seed": cfg.seed,
        "mesh": dict(mesh.shape), "devices": jax.device_count(), "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "hparams": cfg.hparams, **origin,
    }
    summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    if is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _initial_state(cfg: RunConfig, model_cfg: ModelConfig, rng, mesh, state_sh) -> State:
    if not cfg.model.init_from:
        return init_state_sharded(model_cfg, rng, mesh)
    from qwenjax.model_io import load_model

    loaded_cfg, params = load_model(cfg.model.init_from, shardings=state_sh["params"])
    want = abstract_state(model_cfg)["params"]

    def shapes(tree):
        return [(jax.tree_util.keystr(p), x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)]

    if shapes(want) != shapes(params):
        raise UserError(f"model.init_from {cfg.model.init_from}: its parameters do not match the configured "
                        f"model (checkpoint hidden_size={loaded_cfg.hidden_size}, "
                        f"layers={loaded_cfg.num_hidden_layers}, vocab={loaded_cfg.vocab_size})")
    params = jax.tree.map(lambda x, w: x.astype(w.dtype), params, want)
    opt_state = jax.jit(optim.init_opt_state, out_shardings=state_sh["opt_state"])(params)
    step0 = jax.device_put(jnp.zeros((), jnp.int32), state_sh["step"])
    return {"params": params, "opt_state": opt_state, "step": step0}
