"""A run's setup, shared by every member of a loop: validation, mesh, data, iterators, the held-out batches
and their compiled evaluation step. Nothing is written to a run directory here, so a config that fails
validation leaves no trace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from qwenjax.config import ModelConfig, flops_per_token
from qwenjax.data import make_eval_batches, make_train_iterator
from qwenjax.data.prepare import DataSetup, prepare_data
from qwenjax.errors import UserError
from qwenjax.run_config import RunConfig, model_config
from qwenjax.run_stages import short_len_of
from qwenjax.train import metrics as qmetrics
from qwenjax.train import sharding
from qwenjax.train.compile import setup_compilation_cache
from qwenjax.train.objectives import objective_of
from qwenjax.train.step import compiled_eval_step


@dataclasses.dataclass
class RunSetup:
    """What every member of a loop shares: mesh, data, model shape, iterators and the held-out step."""

    cfg: RunConfig
    mesh: Any
    data: DataSetup
    model_cfg: ModelConfig
    train_iter: Any
    eval_sets: list
    eval_fn: Callable
    compile_eval_s: float
    fpt: float  # FLOPs per token
    peak: float
    peak_source: str

    def evaluate(self, params) -> tuple[float, dict[str, float]]:
        return heldout_loss(self.eval_fn, params, self.eval_sets, self.data.weights)


def resolve_dtype(cfg: RunConfig, platform: str | None = None) -> RunConfig:
    """`model.dtype` unset (or auto) -> bfloat16 compute on GPU/TPU (their matmul units), float32 on CPU
    (where bfloat16 is emulated and slower). Parameters and Adam moments stay `model.param_dtype` (float32
    master weights). The trainer calls this before it saves config.yaml, so the file holds the value used."""
    if cfg.model.dtype is not None:
        return cfg
    platform = platform or jax.default_backend()
    return cfg.replace(**{"model.dtype": "bfloat16" if platform in ("gpu", "tpu") else "float32"})


def setup_run(cfg: RunConfig) -> RunSetup:
    """Validate, then build the mesh, data, iterators and held-out batches (nothing is written yet)."""
    mesh = sharding.mesh_from_config(cfg.mesh)
    B, T, k = cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum
    dp = sharding.data_parallel_size(mesh)
    if (B // k) % dp:
        raise UserError(f"train.batch_size ({B}) / train.grad_accum ({k}) = {B // k} is not divisible by the "
                        f"data-parallel size mesh.data x mesh.fsdp = {dp}")
    setup_compilation_cache(cfg.data.resolved_cache_dir())
    data = prepare_data(cfg)
    model_cfg = model_config(cfg, vocab_size=data.vocab_size)
    if data.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {data.vocab_size} tokens but model.vocab_size is "
                        f"{model_cfg.vocab_size}")
    block, n_blocks = sharding.process_batch_block(mesh, B)
    eval_bs = B // k
    e_block, e_blocks = sharding.process_batch_block(mesh, eval_bs)
    source = data.pairs if data.pairs is not None else data.chat  # pairs: one row per pair (train.objective dpo)
    if source is not None:  # conversations packed whole, loss on assistant tokens (docs/post-training.md)
        train_iter = source.train_iterator(seq_len=T, global_batch_size=B, seed=cfg.seed,
                                              truncate=cfg.data.truncate, process_index=block, process_count=n_blocks)
        eval_sets = [[sharding.global_batch(b, mesh, eval_bs) for b in source.eval_batches(
            seq_len=T, batch_size=eval_bs, num_batches=cfg.eval.num_batches(eval_bs), truncate=cfg.data.truncate,
            process_index=e_block, process_count=e_blocks)]]
    else:
        mix = cfg.data.length_mix  # rows of shorter documents (qwenjax.data.length_mix)
        train_iter = make_train_iterator(data.caches, data.weights, seq_len=T, global_batch_size=B,
                                         seed=cfg.seed, process_index=block, process_count=n_blocks,
                                         length_mix=mix and (mix["short"], short_len_of(mix, T)))
        eval_sets = [[sharding.global_batch(b, mesh, eval_bs) for b in make_eval_batches(
            c, seq_len=T, batch_size=eval_bs, num_batches=cfg.eval.num_batches(eval_bs), process_index=e_block,
            process_count=e_blocks)] for c in data.caches]
    eval_fn, compile_eval_s = compiled_eval_step(model_cfg, mesh, eval_bs, T, objective_of(cfg, heldout=True),
                                                 attention_impl=cfg.attention.kernel)
    peak, peak_source = qmetrics.peak_flops(mesh.devices.flat, model_cfg.dtype)
    return RunSetup(cfg, mesh, data, model_cfg, train_iter, eval_sets, eval_fn, compile_eval_s,
                    flops_per_token(model_cfg, T), peak, peak_source)


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
