"""The one bridge from a scaling-law fit to a run config: what `qwenjax predict`, `qwenjax train --hparams` and
the sweep planner share.

- `steps_for_tokens`: the steps that train a token budget D at a batch size (the inverse of
  `run_config.planned_tokens`; defined in `run_config`, which resolves `train.tokens` with it);
- `batch_sequences`: a batch in tokens as sequences (defined in `qwenjax.scaling.units`, the lowest layer that
  needs it, so that `scaling` stays free of run configs);
- `predict_hparams`: the fit's prediction at (N, D), for a model config or a parameter count;
- `apply_hparams`: a run config with optim.lr, train.batch_size and train.steps set from that prediction,
  refusing a fit whose quality flags the lr or batch law (or the loss law it records) unusable unless forced.

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
from qwenjax.run_config import RunConfig, data_parallel_size, model_config, planned_tokens, steps_for_tokens
from qwenjax.scaling.quality import check_usable, quality
from qwenjax.scaling.units import batch_sequences

__all__ = ["HPARAM_KEYS", "apply_hparams", "batch_sequences", "explicit_overrides", "predict_hparams",
           "steps_for_tokens"]

#: the config keys `--hparams` sets (a command-line lr or batch wins over the prediction; a command-line
#: train.steps, like train.tokens, plans D, and the steps are recomputed for the batch used)
HPARAM_KEYS = ("optim.lr", "train.batch_size", "train.steps")


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
    shape = mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, n, cfg.mesh.context)
    return shape[0] * shape[1]


def apply_hparams(cfg: RunConfig, fit_path: str | os.PathLike, explicit: Mapping[str, Any] | None = None,
                  *, num_devices: int | None = None, force: bool = False) -> tuple[RunConfig, list[str]]:
    """Set optim.lr and train.batch_size from the fit's prediction at (N, D) of this config, then
    train.steps = round(D / (batch_size x seq_len)) so the run trains the D the prediction assumed. D is
    train.tokens if set, else the config's own steps x batch_size x seq_len. A command-line lr or batch in
    `explicit` wins over the prediction. Returns (new config, notes for the log; the first is a warning when the
    fit's quality has flags); provenance goes to `hparams`. A law flagged unusable is refused unless `force`."""
    explicit = dict(explicit or {})
    fit = scaling.load_fit(fit_path)
    warning = check_usable(fit, force=force, source=str(fit_path))
    mc = model_config(cfg, vocab_size=cfg.model.vocab_size or 1)  # N excludes the embedding
    n_params = param_counts(mc)[1]
    tokens = cfg.train.tokens if cfg.train.tokens is not None else planned_tokens(cfg)
    tokens = int(tokens) if float(tokens).is_integer() else float(tokens)
    seq_len = cfg.train.seq_len
    multiple_of = _data_parallel(cfg, num_devices) * cfg.train.grad_accum
    prediction = predict_hparams(fit, n_params, tokens, seq_len=seq_len, multiple_of=multiple_of)
    batch_size = int(prediction["batch_size"])
    proposed = {"optim.lr": float(prediction["lr"]), "train.batch_size": batch_size}
    notes = [f"qwenjax: warning: {warning}"] if warning else []
    notes.append(f"--hparams {fit_path}: N = {n_params:,} non-embedding params, D = {tokens:,} tokens -> "
                 f"lr {prediction['lr']:.4g}, batch {batch_size} sequences "
                 f"({prediction['batch_tokens']:.4g} tokens)")
    applied, overridden = {}, {}
    for key, value in proposed.items():
        if key in explicit:
            section, name = key.split(".")
            used = getattr(getattr(cfg, section), name)
            overridden[key] = {"predicted": value, "used": used}
            notes.append(f"--hparams: {key} = {used} from the command line wins over the predicted {value}")
        else:
            applied[key] = value
    batch_used = applied.get("train.batch_size", cfg.train.batch_size)
    steps = steps_for_tokens(tokens, batch_used, seq_len)
    applied["train.steps"] = steps
    trained = steps * batch_used * seq_len
    notes.append(f"--hparams: train.steps = {steps} (was {cfg.train.steps}) trains {trained:,} tokens at "
                 f"batch {batch_used}, the D = {tokens:,} the prediction assumed")
    if prediction.get("warning"):
        notes.append(f"--hparams: {prediction['warning']}")
    provenance = {"source": str(Path(fit_path).expanduser().resolve()), "prediction": prediction,
                  "n_params": n_params, "tokens": tokens, "tokens_assumed": tokens, "tokens_planned": trained,
                  "applied": applied, "overridden": overridden, "quality": quality(fit)["status"],
                  "forced": force and quality(fit)["status"] == "unusable"}
    changes = {**applied, "train.tokens": cfg.train.tokens}  # a token plan stays one (steps now agree with it)
    return cfg.replace(**changes, hparams=provenance), notes
