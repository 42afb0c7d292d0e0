"""What an eval reads: a model directory, a run directory or a Hugging Face folder, plus model overrides.

The overrides change how the stored weights are run, never their shapes: `model.rope_theta=...`,
`model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 1024}` (or dotted,
`model.rope_scaling.factor=4`, merged into the checkpoint's own scaling), `model.max_position_embeddings`,
the sliding window, and `model.dtype` / `model.param_dtype` (params are cast to the latter).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from qwenjax import hf, model_io
from qwenjax.config import ModelConfig
from qwenjax.data.tokenizer import Tokenizer, load_tokenizer
from qwenjax.errors import UserError
from qwenjax.model import Params
from qwenjax.run_config import parse_overrides
from qwenjax.train.run_dir import checkpoint_steps, model_dir_of, restore_run_state

#: model fields an eval may override: how the weights run, not what shapes they have
OVERRIDABLE = ("rope_theta", "rope_scaling", "max_position_embeddings", "use_sliding_window", "sliding_window",
               "max_window_layers", "dtype", "param_dtype", "dual_chunk_attention_config")


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or any(folder.glob("*.model"))


def _load_params(directory: Path) -> tuple[ModelConfig, Params]:
    if model_io.is_model_dir(directory):
        return model_io.load_model(directory)
    if (directory / "config.yaml").is_file():  # a run directory: its model/, else its newest checkpoint
        if model_io.is_model_dir(model_dir_of(directory)):
            return model_io.load_model(model_dir_of(directory))
        if checkpoint_steps(directory):
            config, state, _ = restore_run_state(directory)
            return config, state["params"]
        raise UserError(f"--checkpoint {directory}: this run directory holds no model/ and no checkpoint")
    return hf.load_hf(directory)


def apply_overrides(config: ModelConfig, overrides: Sequence[str] | Mapping) -> ModelConfig:
    """`config` with `model.KEY=VALUE` overrides applied (KEY in OVERRIDABLE); UserError on anything else."""
    tree = parse_overrides(overrides)
    extra = sorted(set(tree) - {"model"})
    if extra or not isinstance(tree.get("model", {}), dict):
        raise UserError(f"override {extra[0] if extra else 'model'}: only model.KEY=VALUE overrides apply to "
                        f"an eval (KEY one of {', '.join(OVERRIDABLE)})")
    changes = dict(tree.get("model", {}))
    bad = sorted(set(changes) - set(OVERRIDABLE))
    if bad:
        raise UserError(f"model.{bad[0]} cannot be overridden for an eval (it changes the weights' shapes or is "
                        f"not a model field); allowed: {', '.join(OVERRIDABLE)}")
    scaling = changes.get("rope_scaling", "unset")
    if isinstance(scaling, dict):
        changes["rope_scaling"] = {**(config.rope_scaling_dict or {}), **scaling}
    elif scaling not in ("unset", None):
        raise UserError(f"model.rope_scaling must be a mapping or null, got {scaling!r}")
    if "rope_theta" in changes and not isinstance(changes["rope_theta"], (int, float)):
        raise UserError(f"model.rope_theta must be a number, got {changes['rope_theta']!r}")
    try:
        return config.replace(**changes)
    except TypeError as e:
        raise UserError(f"bad model override: {e}") from None


def _tokenizer_source(directory: Path) -> Path | None:
    """Where the checkpoint's tokenizer is: beside the params, or (a run) named in summary.json."""
    if (directory / "config.yaml").is_file() and not model_io.is_model_dir(directory):
        folder = model_dir_of(directory)
        if _has_tokenizer(folder):
            return folder
        summary = directory / "summary.json"
        recorded = json.loads(summary.read_text()).get("tokenizer") if summary.is_file() else None
        return Path(recorded) if recorded and Path(recorded).exists() else None
    return directory if _has_tokenizer(directory) else None


def load_for_eval(checkpoint: str | Path, overrides: Sequence[str] | Mapping = (),
                  tokenizer: str | Path | None = None,
                  check: Callable[[Tokenizer], None] | None = None) -> tuple[ModelConfig, Params, Tokenizer]:
    """(config with overrides, params in its param_dtype, tokenizer) for an eval. The tokenizer is
    `tokenizer` when given, else the one stored with the checkpoint (a run's is in its summary.json).
    `check(tokenizer)` runs before the params are read, so input that the tokenizer shows wrong fails fast."""
    directory = Path(checkpoint).expanduser()
    if not directory.is_dir():
        raise UserError(f"--checkpoint {directory} is not a folder")
    if not any((directory / name).is_file() for name in (model_io.CONFIG_FILE, "config.yaml", "config.json")):
        raise UserError(f"--checkpoint {directory} holds no qwenjax model ({model_io.CONFIG_FILE}), run "
                        "directory (config.yaml) or Hugging Face checkpoint (config.json)")
    if overrides:  # check them before the (slow) load
        apply_overrides(model_io.load_config(directory) if model_io.is_model_dir(directory) else ModelConfig(),
                        overrides)
    source = tokenizer if tokenizer is not None else _tokenizer_source(directory)
    if source is None:
        raise UserError(f"no tokenizer found for {directory} (tokenizer.json or *.model); pass --tokenizer PATH")
    tok = load_tokenizer(source)
    if check is not None:
        check(tok)
    config, params = _load_params(directory)
    config = apply_overrides(config, overrides)
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(config.param_dtype)), params)
    if tok.vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}; "
                        "is it the right tokenizer?")
    return config, params, tok
