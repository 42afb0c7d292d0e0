"""Hugging Face Qwen2 checkpoints (`config.json` + safetensors) to and from qwenjax parameters.

Names and layouts (spec §1.8): a torch Linear weight is [out, in], a qwenjax kernel is [in, out], so every
projection and the lm_head are transposed; the embedding, biases and norm weights copy as they are.

Loading streams one tensor at a time (read, transpose, cast, place on its devices) so that a 7B checkpoint
never needs two full host copies. Tensors are read with `safetensors.safe_open(framework="numpy")`; bfloat16,
which numpy does not know, is read from the raw bytes and viewed as `ml_dtypes.bfloat16` (shipped with JAX).
Neither direction needs torch. Saving writes safetensors directly (same format, `{"format": "pt"}` metadata),
sharded with an index above `max_shard_bytes`, into a temporary folder that is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from qwenjax.config import ModelConfig, load_hf_config
from qwenjax.errors import UserError
from qwenjax.model import Params, abstract_params, stack_layers, unstack_layers

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3

# safetensors dtype code <-> numpy dtype
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
# Tensors some older exports carry that are recomputed, not loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

Sharding = jax.sharding.Sharding
Shardings = Any  # a pytree like params of Sharding, or a callable path -> Sharding


# ---------------------------------------------------------------------------------------------------------
# The name map


def tensor_map(config: ModelConfig) -> list[tuple[str, tuple[Any, ...], bool]]:
    """(HF tensor name, qwenjax param path, transpose?) for every parameter, in HF's order.

    Paths use the param dict's own keys (integer layer indices). The lm_head is absent when tied; a sequence
    classifier (`config.num_labels`, HF Qwen2ForSequenceClassification) has `score.weight` instead.
    """
    entries: list[tuple[str, tuple[Any, ...], bool]] = [
        ("model.embed_tokens.weight", ("embed_tokens",), False)]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        entries.append((p + "input_layernorm.weight", ("layers", i, "input_layernorm", "weight"), False))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            attn = ("layers", i, "self_attn", proj)
            entries.append((p + f"self_attn.{proj}.weight", (*attn, "kernel"), True))
            if proj != "o_proj":
                entries.append((p + f"self_attn.{proj}.bias", (*attn, "bias"), False))
        entries.append((p + "post_attention_layernorm.weight",
                        ("layers", i, "post_attention_layernorm", "weight"), False))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            entries.append((p + f"mlp.{proj}.weight", ("layers", i, "mlp", proj, "kernel"), True))
    entries.append(("model.norm.weight", ("norm", "weight"), False))
    if config.num_labels is not None:
        entries.append(("score.weight", ("score", "kernel"), True))
    elif not config.tie_word_embeddings:
        entries.append(("lm_head.weight", ("lm_head", "kernel"), True))
    return entries


def _get(tree: Mapping, path: tuple[Any, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[Any, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _sharding_for(shardings: Shardings | None, path: tuple[Any, ...]) -> Sharding | None:
    """The sharding of one param: `shardings(path)` with string keys (as `model.param_paths`), or a lookup."""
    if shardings is None:
        return None
    if callable(shardings) and not isinstance(shardings, Mapping):
        return shardings(tuple(str(k) for k in path))
    return _get(shardings, path)


def _place(array_np: np.ndarray, sharding: Sharding | None) -> jax.Array:
    if sharding is None:
        return jnp.asarray(array_np)
    return jax.make_array_from_callback(array_np.shape, sharding, lambda index: array_np[index])


# ---------------------------------------------------------------------------------------------------------
# Reading safetensors


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise UserError(f"cannot read safetensors header of {file}: {e}") from None
    return header, 8 + n


class _SafetensorsFile:
    """One open safetensors file; `read(name)` returns a numpy array (bfloat16 via ml_dtypes)."""

    def __init__(self, file: Path):
        self.file = file
        try:
            self._handle = safe_open(str(file), framework="numpy")
            self._f = self._handle.__enter__()
        except Exception as e:  # safetensors raises its own error types
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot open {file}: {reason}") from None
        self._raw_header: tuple[dict[str, Any], int] | None = None

    def close(self) -> None:
        self._handle.__exit__(None, None, None)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        code = self._f.get_slice(name).get_dtype()
        if code != "BF16":
            return self._f.get_tensor(name)
        # numpy has no bfloat16: read this tensor's bytes and view them as ml_dtypes.bfloat16.
        if self._raw_header is None:
            self._raw_header = _read_header(self.file)
        header, data_start = self._raw_header
        begin, end = header[name]["data_offsets"]
        shape = tuple(header[name]["shape"])
        with open(self.file, "rb") as f:
            f.seek(data_start + begin)
            data = f.read(end - begin)
        return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(shape)


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (from the index, or by listing the files)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"malformed {index}: {e}") from None
        out = {name: directory / fname for name, fname in weight_map.items()}
        for f in sorted(set(out.values())):
            if not f.is_file():
                raise UserError(f"{index} lists {f.name}, which does not exist")
        return out
    files = [directory / SINGLE_FILE] if (directory / SINGLE_FILE).is_file() else sorted(
        directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"no safetensors files in {directory} (expected {SINGLE_FILE} or {INDEX_FILE})")
    out = {}
    for f in files:
        header, _ = _read_header(f)
        out.update({name: f for name in header if name != "__metadata__"})
    return out


def _resolve_dtype(dtype, directory: Path) -> str | None:
    if dtype is None:
        return None
    if dtype == "auto":  # whatever the checkpoint says it was saved in
        d = json.loads((directory / "config.json").read_text())
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unsupported dtype {dtype!r} (use float32, bfloat16 or float16)")
    return name


def load_hf(path: str | os.PathLike, *, dtype=None, shardings: Shardings | None = None,
            scan_layers: bool | None = None) -> tuple[ModelConfig, Params]:
    """Load a HF Qwen2 checkpoint directory into (ModelConfig, params).

    `dtype`: None keeps `ModelConfig`'s defaults (float32 params and compute); "bfloat16"/"float16"/"float32"
    sets both the parameter and the compute dtype; "auto" takes the checkpoint's `torch_dtype`.
    `shardings`: a pytree like the params of `jax.sharding.Sharding`, or a callable taking a param path
    (tuple of strings, as `qwenjax.model.param_paths`) and returning one; each tensor is placed as soon as it
    is read. Without it, arrays go to the default device.
    The params come in `config.scanned`'s layout (`scan_layers` overrides the depth rule): a scanned config's
    layers are read per layer (a callable `shardings` sees per-layer paths), then stacked (a pytree
    `shardings` is then applied to the stack).
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UserError(f"HF checkpoint directory {directory} does not exist")
    config = load_hf_config(directory)
    dtype = _resolve_dtype(dtype, directory)
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    if scan_layers is not None:
        config = config.replace(scan_layers=scan_layers)
    expected = abstract_params(config.replace(scan_layers=False))  # the files' layout: one tensor per layer
    stack_shardings = shardings if config.scanned and isinstance(shardings, Mapping) else None
    shardings = None if stack_shardings is not None else shardings
    where = _checkpoint_files(directory)
    wanted = tensor_map(config)
    known = {name for name, _, _ in wanted} | {"lm_head.weight"}
    for name in where:
        if name not in known and not name.endswith(_IGNORED_SUFFIXES):
            raise UserError(f"{directory}: unexpected tensor {name} for a {config.num_hidden_layers}-layer "
                            "qwen2 config (does config.json match the weights?)")
    for name, _, _ in wanted:
        if name not in where:
            hint = " (config.json says tie_word_embeddings is false)" if name == "lm_head.weight" else ""
            raise UserError(f"{directory}: missing tensor {name}{hint}")

    params: dict[str, Any] = {}
    open_files: dict[Path, _SafetensorsFile] = {}
    try:
        for name, param_path, transpose in wanted:
            file = where[name]
            if file not in open_files:
                open_files[file] = _SafetensorsFile(file)
            st = open_files[file]
            want = _get(expected, param_path)
            want_shape = tuple(want.shape[::-1]) if transpose else tuple(want.shape)
            found = st.shape(name)
            if found != want_shape:
                raise UserError(f"{file.name}: tensor {name} has shape {list(found)}, expected "
                                f"{list(want_shape)} from config.json")
            array = st.read(name)
            array = (array.T if transpose else array).astype(want.dtype, order="C", copy=False)  # <= 1 copy
            _set(params, param_path, _place(array, _sharding_for(shardings, param_path)))
    finally:
        for st in open_files.values():
            st.close()
    if config.scanned:
        params = stack_layers(params)
        if stack_shardings is not None:
            params = jax.device_put(params, stack_shardings)
    return config, params


# ---------------------------------------------------------------------------------------------------------
# Writing


def hf_config_dict(config: ModelConfig, dtype: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json for `config`: the legacy keys (`rope_theta`, `rope_scaling`) that transformers 4.x reads
    and `rope_parameters`, which transformers 5.x writes, so both generations load the same RoPE."""
    d = config.to_hf_dict()
    d["torch_dtype"] = d["dtype"] = dtype
    scaling = dict(config.rope_scaling_dict or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    d["rope_parameters"] = {**scaling, "rope_type": rope_type, "rope_theta": config.rope_theta}
    if not config.use_sliding_window:
        d["sliding_window"] = None
    if extra:
        d.update(extra)
    return d


def _header_bytes(entries: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dt in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _ST_CODES[dt], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data start stays 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_safetensors(file: Path, tensors: list[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]],
                       dt: np.dtype) -> None:
    """Write tensors one at a time: the header first (shapes are known), then each tensor's bytes."""
    with open(file, "wb") as f:
        f.write(_header_bytes([(name, shape, dt) for name, _, shape in tensors]))
        for name, fetch, shape in tensors:
            array = np.ascontiguousarray(fetch())
            if array.shape != shape or array.dtype != dt:
                raise AssertionError(f"{name}: {array.shape} {array.dtype} != {shape} {dt}")
            f.write(array.tobytes())
        f.flush()
        os.fsync(f.fileno())


def _plan_shards(entries: list[tuple[str, Any, tuple[int, ...]]], itemsize: int,
                 max_shard_bytes: int) -> list[list[tuple[str, Any, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[2], dtype=np.int64)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def save_hf(path: str | os.PathLike, config: ModelConfig, params: Params, *, dtype=None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_config: Mapping[str, Any] | None = None,
            overwrite: bool = False) -> Path:
    """Write a HF checkpoint that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    `dtype`: the tensor dtype on disk (default: the params' own, i.e. `config.param_dtype`). Tied configs get
    no `lm_head.weight`. Above `max_shard_bytes` the weights are split into `model-0000i-of-0000n.safetensors`
    with `model.safetensors.index.json`. `extra_config` adds keys to config.json (for example token ids).
    Everything is written into a temporary sibling folder that is renamed to `path` once complete;
    an existing non-empty `path` is an error unless `overwrite`. Returns the path.
    """
    target = Path(path).expanduser()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())) and not overwrite:
        raise UserError(f"{target} already exists; choose a new folder (or pass overwrite=True)")
    params = unstack_layers(params)  # either layout; the files hold one tensor per layer
    expected = abstract_params(config.replace(scan_layers=False))
    entries = tensor_map(config)
    for name, param_path, _ in entries:
        try:
            got = _get(params, param_path)
        except (KeyError, TypeError):
            raise UserError(f"params have no {'/'.join(map(str, param_path))} (needed for {name})") from None
        if tuple(got.shape) != tuple(_get(expected, param_path).shape):
            raise UserError(f"param {'/'.join(map(str, param_path))} has shape {list(got.shape)}, expected "
                            f"{list(_get(expected, param_path).shape)} from the config")
    if dtype is None:
        dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype).name
    dt = np.dtype(jnp.dtype(dtype))
    if dt not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
        raise UserError(f"unsupported dtype {dtype!r} for save_hf (use float32, bfloat16 or float16)")

    def fetch(param_path, transpose):
        def read() -> np.ndarray:
            array = np.asarray(jax.device_get(_get(params, param_path)))
            return (array.T if transpose else array).astype(dt, copy=False)
        return read

    planned = []
    for name, param_path, transpose in entries:
        shape = tuple(_get(expected, param_path).shape)
        planned.append((name, fetch(param_path, transpose), shape[::-1] if transpose else shape))
    shards = _plan_shards(planned, dt.itemsize, max_shard_bytes)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config_json = hf_config_dict(config, jnp.dtype(dt).name, extra_config)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            _write_safetensors(tmp / SINGLE_FILE, shards[0], dt)
        else:
            weight_map = {}
            for k, shard in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / fname, shard, dt)
                weight_map.update({name: fname for name, _, _ in shard})
            total = sum(int(np.prod(s, dtype=np.int64)) * dt.itemsize for _, _, s in planned)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

