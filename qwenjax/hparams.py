"""The one bridge from a scaling-law fit to a run config: what `qwenjax predict`, `qwenjax train --hparams` and
the sweep planner share.

- `steps_for_tokens`: the steps that train a token budget D at a batch size (the inverse of
  `run_config.planned_tokens`);
- `batch_sequences`: a batch in tokens as sequences (defined in `qwenjax.scaling.units`, the lowest layer that
  needs it, so that `scaling` stays free of run configs);
- `predict_hparams`: the fit's prediction at (N, D), for a model config or a parameter count;
- `apply_hparams`: a run config with optim.lr, train.batch_size and train.steps set from that prediction.

The fit is read through the `qwenjax.scaling` package (`scaling.load_fit`, `scaling.predict`), so a notebook
or test that substitutes those changes every caller at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import qwenjax.scaling as scaling
from qwenjax.config import ModelConfig, param_counts
from qwenjax.run_config import RunConfig, data_parallel_size, model_config, planned_tokens
from qwenjax.scaling.units import batch_sequences

__all__ = ["HPARAM_KEYS", "apply_hparams", "batch_sequences", "explicit_overrides", "predict_hparams",
           "steps_for_tokens"]

#: the config keys `--hparams` sets (a command-line override of one of them wins over the prediction)
HPARAM_KEYS = ("optim.lr", "train.batch_size", "train.steps")


def steps_for_tokens(tokens: float, batch_size: int, seq_len: int) -> int:
    """Steps that train `tokens` tokens in batches of `batch_size` sequences of `seq_len`: nearest, at least 1."""
    return max(1, round(tokens / (batch_size * seq_len)))


def predict_hparams(fit: Mapping | str | os.PathLike, model: ModelConfig | float | str, tokens, *,
                    seq_len: int | None = None, multiple_of: int = 1) -> dict:
    """`scaling.predict` of `fit` (a path is loaded) at N = the model's non-embedding parameter count (or a
    count such as 494M) and D = `tokens`; batch_size in sequences of `seq_len`, a multiple of `multiple_of`."""
    fit = fit if isinstance(fit, Mapping) else scaling.load_fit(fit)
    n_params = param_counts(model)[1] if isinstance(model, ModelConfig) else model
    return scaling.predict(fit, n_params, tokens, seq_len=seq_len, multiple_of=multiple_of)


def explicit_overrides(override_tree: Mapping[str, Any]) -> dict[str, Any]:
    """The `HPARAM_KEYS` present in parsed command-line overrides (`run_config.parse_overrides`)."""
    explicit = {}
    for key in HPARAM_KEYS:
        section, name = key.split(".")
        if name in (override_tree.get(section) or {}):
            explicit[key] = override_tree[section][name]
    return explicit


def _data_parallel(cfg: RunConfig, num_devices: int | None) -> int:
    dp = data_parallel_size(cfg.mesh)
    if dp is not None:
        return dp
    # JAX only here, where the mesh leaves an axis to the device count (the planner and `predict` never do)
    import jax

    from qwenjax.train.sharding import mesh_shape

    n = num_devices if num_devices is not None else jax.device_count()
    shape = mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, n)
    return shape[0] * shape[1]


def apply_hparams(cfg: RunConfig, fit_path: str | os.PathLike, explicit: Mapping[str, Any] | None = None,
                  *, num_devices: int | None = None) -> tuple[RunConfig, list[str]]:
    """Set optim.lr and train.batch_size from the fit's prediction at (N, D) of this config, keeping D
    (train.steps = round(D / (batch_size x seq_len))). Keys in `explicit` (command-line overrides) win.
    Returns (new config, notes for the log); provenance goes to `hparams`."""
    explicit = dict(explicit or {})
    mc = model_config(cfg, vocab_size=cfg.model.vocab_size or 1)  # N excludes the embedding
    n_params = param_counts(mc)[1]
    tokens = planned_tokens(cfg)
    seq_len = cfg.train.seq_len
    multiple_of = _data_parallel(cfg, num_devices) * cfg.train.grad_accum
    prediction = predict_hparams(fit_path, n_params, tokens, seq_len=seq_len, multiple_of=multiple_of)
    batch_size = int(prediction["batch_size"])
    proposed = {"optim.lr": float(prediction["lr"]), "train.batch_size": batch_size,
                "train.steps": steps_for_tokens(tokens, batch_size, seq_len)}
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
    return cfg.replace(**applied, hparams=provenance), notes
