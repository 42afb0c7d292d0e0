"""`train --hparams FIT.json`: lr and batch size from a fit's prediction."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from qwenjax.run_config import RunConfig, data_parallel_size, model_config, planned_tokens
from qwenjax.train import sharding

HPARAM_KEYS = ("optim.lr", "train.batch_size", "train.steps")


def apply_hparams(cfg: RunConfig, fit_path: str | os.PathLike, explicit: Mapping[str, Any] | None = None,
                  *, num_devices: int | None = None) -> tuple[RunConfig, list[str]]:
    """Set optim.lr and train.batch_size from the fit's prediction at (N, D) of this config, keeping D
    (train.steps = round(D / (batch_size x seq_len))). Keys in `explicit` (command-line overrides) win.
    Returns (new config, notes for the log); provenance goes to `hparams`."""
    from qwenjax.model import count_params
    from qwenjax.scaling import load_fit, predict

    fit = load_fit(fit_path)
    explicit = dict(explicit or {})
    mc = model_config(cfg, vocab_size=cfg.model.vocab_size or 1)  # N excludes the embedding
    n_params = count_params(mc)[1]
    tokens = planned_tokens(cfg)
    seq_len = cfg.train.seq_len
    dp = data_parallel_size(cfg.mesh)
    if dp is None:
        n = num_devices if num_devices is not None else jax.device_count()
        shape = sharding.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, n)
        dp = shape[0] * shape[1]
    prediction = predict(fit, n_params, tokens, seq_len=seq_len, multiple_of=dp * cfg.train.grad_accum)
    batch_size = int(prediction["batch_size"])
    proposed = {"optim.lr": float(prediction["lr"]), "train.batch_size": batch_size,
                "train.steps": max(1, round(tokens / (batch_size * seq_len)))}
    notes = [f"--hparams {fit_path}: N = {n_params:,} non-embedding params, D = {tokens:,} tokens -> "
             f"lr {prediction['lr']:.4g}, batch {batch_size} sequences "
             f"({prediction['batch_tokens']:.4g} tokens)"]
    applied, overridden = {}, {}
    for key, value in proposed.items():
        if key in explicit:
            section, name = key.split(".")
            used = getattr(getattr(cfg, section), name)
            overridden[key] = {"predicted": value, "used": used}
            notes.append(f"--hparams: {key} = {used} from the command line wins over the predicted {value}")
        else:
            applied[key] = value
    if "train.steps" in applied:
        notes.append(f"--hparams: train.steps = {applied['train.steps']} (was {cfg.train.steps}) keeps D = "
                     f"{tokens:,} planned tokens at the new batch size")
    if prediction.get("warning"):
        notes.append(f"--hparams: {prediction['warning']}")
    provenance = {"source": str(Path(fit_path).expanduser().resolve()), "prediction": prediction,
                  "n_params": n_params, "tokens": tokens, "applied": applied, "overridden": overridden}
    new = cfg.replace(**applied, hparams=provenance)
    return new, notes
