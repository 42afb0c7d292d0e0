"""Params-only model checkpoints: what `qwenjax convert --from-hf` writes, what a finished run leaves in
`RUN_DIR/model/` (and `qwenjax export` writes), and what training can start from (`model.init_from`).

Layout of a model directory:
    model_config.json   every `ModelConfig` field but the runtime ones (`config.RUNTIME_FIELDS`: scan_layers,
                        remat); dtype and param_dtype included; rope_scaling as an object
    params/             an Orbax `StandardCheckpointer` checkpoint of the params dict, one entry per layer
                        (stacked params are unstacked on save and stacked again on load: either layout reads)

`params/` is written first (Orbax commits it atomically), `model_config.json` last (written to a temporary
file and renamed), so a directory with `model_config.json` is always complete. Restoring uses an abstract
target built from the config (`qwenjax.model.abstract_params`), so integer layer keys, shapes and dtypes come
back exactly and each array is placed straight onto its sharding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwenjax.config import RUNTIME_FIELDS, ModelConfig
from qwenjax.errors import UserError
from qwenjax.model import Params, abstract_params, stack_layers, unstack_layers

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in RUNTIME_FIELDS}
    d["rope_scaling"] = config.rope_scaling_dict
    return d


def config_from_dict(d: Mapping[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"{source}: unknown model field {unknown[0]!r}")
    return ModelConfig(**d)


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a model_io checkpoint (as opposed to, say, a HF folder)."""
    return (Path(path).expanduser() / CONFIG_FILE).is_file()


def _check_structure(config: ModelConfig, params: Params) -> None:
    expected = abstract_params(config)
    want = {tuple(map(str, p)): x.shape for p, x in _leaves(expected)}
    got = {tuple(map(str, p)): getattr(x, "shape", None) for p, x in _leaves(params)}
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing:
        raise UserError(f"params lack {'/'.join(missing[0])}, which the config requires")
    if extra:
        raise UserError(f"params have {'/'.join(extra[0])}, which the config does not define")
    for path, shape in want.items():
        if tuple(got[path]) != tuple(shape):
            raise UserError(f"param {'/'.join(path)} has shape {list(got[path])}, expected {list(shape)}")


def _leaves(tree):
    return [(tuple(getattr(k, "key", k) for k in path), x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def save_model(directory: str | os.PathLike, config: ModelConfig, params: Params, *,
               overwrite: bool = False) -> Path:
    """Save `params` (a pytree matching `abstract_params(config)`) and the config. Returns the directory.

    The params' dtype must be `config.param_dtype` (what `load_model` restores them as). Call it on every
    process of a multi-process job (Orbax coordinates the write).
    """
    directory = Path(directory).expanduser().absolute()
    params = unstack_layers(params)  # the on-disk layout, whatever the run's
    _check_structure(config.replace(scan_layers=False), params)
    dtypes = {jax.numpy.dtype(x.dtype).name for x in jax.tree.leaves(params)}
    if dtypes != {config.param_dtype}:
        raise UserError(f"params are {', '.join(sorted(dtypes))} but config.param_dtype is "
                        f"{config.param_dtype}; cast them or use config.replace(param_dtype=...)")
    if (directory / CONFIG_FILE).exists() or (directory / PARAMS_DIR).exists():
        if not overwrite:
            raise UserError(f"{directory} already holds a model checkpoint; choose a new folder")
        (directory / CONFIG_FILE).unlink(missing_ok=True)  # the directory is incomplete until the end
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(directory / PARAMS_DIR, params, force=overwrite)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        tmp = directory / f".{CONFIG_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        os.replace(tmp, directory / CONFIG_FILE)
    return directory


def load_config(directory: str | os.PathLike) -> ModelConfig:
    f = Path(directory).expanduser() / CONFIG_FILE
    if not f.is_file():
        raise UserError(f"no {CONFIG_FILE} in {f.parent} (not a qwenjax model checkpoint, or an "
                        "incomplete one)")
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"malformed {f}: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"malformed {f}: expected a JSON object")
    return config_from_dict(d, str(f))


def load_model(directory: str | os.PathLike, *, shardings=None,
               scan_layers: bool | None = None) -> tuple[ModelConfig, Params]:
    """(config, params) from a `save_model` directory, in the layout of `config.scanned` (`scan_layers`
    overrides the config's, e.g. a run's `model.scan_layers`).

    `shardings`: a pytree like the params (in that layout) of `jax.sharding.Sharding`, or a callable taking a
    per-layer param path (tuple of strings, as `qwenjax.model.param_paths`); default: everything on the first
    local device.
    """
    directory = Path(directory).expanduser().absolute()
    config = load_config(directory)
    if scan_layers is not None:
        config = config.replace(scan_layers=scan_layers)
    stacked = config.scanned and isinstance(shardings, Mapping)
    if not (directory / PARAMS_DIR).is_dir():
        raise UserError(f"{directory} has {CONFIG_FILE} but no {PARAMS_DIR}/ folder")
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(path, leaf):
        keys = tuple(getattr(k, "key", k) for k in path)
        if shardings is None:
            sharding = default
        elif callable(shardings) and not isinstance(shardings, Mapping):
            sharding = shardings(tuple(str(k) for k in keys))
        else:
            sharding = shardings
            for k in (keys[:1] + keys[2:]) if stacked and keys[0] == "layers" else keys:
                sharding = sharding[k]
            if stacked and keys[0] == "layers":  # one layer's slice of a stacked param
                sharding = NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    abstract = jax.tree_util.tree_map_with_path(target, abstract_params(config.replace(scan_layers=False)))
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(directory / PARAMS_DIR, abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot restore {directory / PARAMS_DIR} for its {CONFIG_FILE}: {first}") from None
    finally:
        checkpointer.close()
    if config.scanned:
        params = jax.jit(stack_layers, out_shardings=shardings if stacked else None)(params)
    return config, params
