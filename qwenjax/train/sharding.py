"""Device mesh, the logical-axis rules table, and the shardings of parameters, optimizer state and batches.

Sharding is decided here and nowhere else. The model names the logical axes of each parameter
(`qwenjax.model.logical_axes`) and of its activations (`qwenjax.model.constrain`, active inside
`activation_sharding`); `LOGICAL_AXIS_RULES` maps each logical axis to mesh axes:

    mesh axes: data (pure data parallel: params replicated), fsdp (data parallel with params and
               optimizer state sharded, ZeRO-3 style), tensor (Megatron-style splits of heads and MLP),
               context (the sequence split along its length: attention in `qwenjax.context_parallel`)

A logical axis whose size is not divisible by its mesh axes is replicated along them instead (logged at
debug level), so any model runs on any mesh, only less efficiently.

Multi-host: `maybe_initialize_distributed()` starts JAX's multi-controller runtime when the environment
describes one (before anything touches a JAX backend); every process then runs the same program and feeds
its own rows of each global batch (`global_batch`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qwenjax import context_parallel
from qwenjax.config import ModelConfig
from qwenjax.errors import UserError
from qwenjax.model import ACTIVATION_CONSTRAINT, logical_axes

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")  # the axes of mesh_shape's result; a mesh also has `context`
CONTEXT = context_parallel.AXIS
MESH_ORDER = ("data", "fsdp", CONTEXT, "tensor")  # the device mesh (tensor innermost: the most traffic)

# THE table: logical axis -> mesh axes (None = replicated), for parameters and activations alike. Batch is
# split over both data-parallel axes; an axis takes only mesh axes no earlier dimension took, so an activation
# [batch, length, embed] is split by rows only, while an [embed, mlp] kernel is split over fsdp x tensor.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": (CONTEXT,),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": None,
    "layers": None,  # the leading axis of stacked (scanned) layer params: every device holds every layer
}


# ---------------------------------------------------------------------------------------------------------
# Multi-host start-up


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise UserError(f"environment variable {name} must be an integer, got {value!r}") from None
    return None


def distributed_env() -> dict[str, Any] | None:
    """The multi-process setup the environment asks for, or None for a single process.

    Recognised: QWENJAX_COORDINATOR / QWENJAX_NUM_PROCESSES / QWENJAX_PROCESS_ID, JAX's own
    JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES / JAX_PROCESS_ID), SLURM and Open MPI jobs of more than one
    task, and multi-host Cloud TPU slices (TPU_WORKER_HOSTNAMES with several hosts). QWENJAX_DISTRIBUTED=0
    turns it off.
    """
    if os.environ.get("QWENJAX_DISTRIBUTED", "").lower() in ("0", "false", "no"):
        return None
    address = os.environ.get("QWENJAX_COORDINATOR") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = _env_int("QWENJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    pid = _env_int("QWENJAX_PROCESS_ID", "JAX_PROCESS_ID")
    if address:
        return {"coordinator_address": address, "num_processes": num, "process_id": pid}
    if (_env_int("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
        return {}
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return {}
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return {}
    return None


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize` when the environment describes several processes (idempotent).

    Must run before the first JAX computation. CPU processes exchange collectives over gloo.
    Returns True when running multi-process.
    """
    from jax._src import distributed as _distributed  # the public API offers no "is initialised" query

    if _distributed.global_state.client is not None:
        return True
    setup = distributed_env()
    if setup is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**setup)
    except RuntimeError as e:
        raise UserError(f"cannot start multi-process JAX: {str(e).splitlines()[0]}") from None
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


# ---------------------------------------------------------------------------------------------------------
# Mesh


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int, context: int = 1) -> tuple[int, int, int]:
    """(data, fsdp, tensor): resolve one -1 to the devices left after the others and `context` (a
    positive size); the product with `context` must equal the device count."""
    sizes = [data, fsdp, tensor]
    known = math.prod(s for s in sizes if s != -1) * context
    names, values = list(MESH_AXES), list(sizes)
    if context != 1:
        names, values = [*names, CONTEXT], [*values, context]
    if -1 in sizes:
        if num_devices % known:
            given = ", ".join(f"mesh.{n}={s}" for n, s in zip(names, values, strict=True) if s != -1)
            raise UserError(f"mesh: {num_devices} devices cannot be split with {given}")
        i = sizes.index(-1)
        sizes[i] = values[i] = num_devices // known
    if math.prod(values) != num_devices:
        raise UserError(f"mesh: {' x '.join(f'mesh.{n}' for n in names)} = {' x '.join(map(str, values))} = "
                        f"{math.prod(values)}, but there are {num_devices} devices (use -1 for 'the rest')")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, context: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over all devices (of all processes) with automatic (GSPMD) axes."""
    devices = list(devices if devices is not None else jax.devices())
    d, f, t = mesh_shape(data, fsdp, tensor, len(devices), context)
    return jax.make_mesh((d, f, context, t), MESH_ORDER, axis_types=(AxisType.Auto,) * 4, devices=devices)


def mesh_from_config(mesh_cfg) -> Mesh:
    """From a `RunConfig.mesh` section (anything with data/fsdp/tensor and optionally context attributes)."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, context=getattr(mesh_cfg, "context", 1))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(_size(mesh, a) for a in LOGICAL_AXIS_RULES["batch"])


def context_size(mesh: Mesh) -> int:
    """How many slices each sequence is split into (1 on a mesh without a context axis)."""
    return _size(mesh, CONTEXT)


def _size(mesh: Mesh, axis: str) -> int:
    return mesh.shape.get(axis, 1)  # meshes of (data, fsdp, tensor) only, as older callers build, lack context


# ---------------------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec


def _divides(logical: str, dim: int, size: int, config: ModelConfig | None) -> bool:
    """Heads are split whole: the flattened heads x head_dim axis needs heads % size == 0."""
    if config is not None and logical == "heads":
        dim = config.num_attention_heads
    elif config is not None and logical == "kv_heads":
        dim = config.num_key_value_heads
    return dim % size == 0


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                    config: ModelConfig | None = None, *, name: str = "") -> P:
    """PartitionSpec for an array with these logical axes, replicating axes that do not divide evenly."""
    spec, used = [], set()
    for logical, dim in zip(axes, shape, strict=True):
        mesh_axes = LOGICAL_AXIS_RULES.get(logical) if logical else None
        if logical is not None and logical not in LOGICAL_AXIS_RULES:
            raise KeyError(f"no sharding rule for logical axis {logical!r}")
        # keep only mesh axes of size > 1 that are not already used by an earlier dimension
        mesh_axes = tuple(a for a in (mesh_axes or ()) if _size(mesh, a) > 1 and a not in used)
        size = math.prod(_size(mesh, a) for a in mesh_axes)
        if mesh_axes and not _divides(logical, dim, size, config):
            log.debug("sharding: %s axis %r (%d) is not divisible by mesh %s (%d); replicated",
                      name or "array", logical, dim, mesh_axes, size)
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_specs(abstract_params, mesh: Mesh, config: ModelConfig | None = None):
    """PartitionSpecs of a parameter pytree (by the model's logical axes)."""
    def spec(path, x):
        keys = _dict_keys(path)
        return logical_to_spec(logical_axes(keys), x.shape, mesh, config, name="/".join(keys))

    return jax.tree_util.tree_map_with_path(spec, abstract_params)


def state_shardings(abstract_state, mesh: Mesh, config: ModelConfig | None = None):
    """NamedShardings of any pytree whose array leaves are parameters or parameter-shaped optimizer
    moments (found by the dict keys on their path); scalars (step, counts) and unknown leaves replicated."""
    def sharding(path, x):
        keys = _dict_keys(path)
        axes = None
        for i in range(len(keys)):  # the param path is a suffix of the state path (e.g. opt_state/.../mu/...)
            try:
                axes = logical_axes(keys[i:])
            except (KeyError, IndexError):
                continue
            if len(axes) == len(getattr(x, "shape", ())):
                break
            axes = None
        if axes is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, config, name="/".join(keys)))

    return jax.tree_util.tree_map_with_path(sharding, abstract_state)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, config: ModelConfig | None = None):
    """Within this block, `qwenjax.model.constrain(x, axes)` pins activations to the rules table on `mesh`
    (wrap the tracing: `jit(...).lower`). Without the pins, GSPMD propagates the embedding table's
    [vocab: tensor, embed: fsdp] layout into the token embeddings, whose rows are already split over fsdp,
    and must replicate them to undo it (XLA's "involuntary full rematerialization"). Nothing on one device.
    On a mesh with context > 1 attention also runs split along the sequence (`qwenjax.context_parallel`)."""
    if mesh.size == 1:
        yield
        return

    def pin(x, axes):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, config)))

    token = ACTIVATION_CONSTRAINT.set(pin)
    try:
        with context_parallel.context_mesh(mesh, lambda axes, shape: logical_to_spec(axes, shape, mesh, config)):
            yield
    finally:
        ACTIVATION_CONSTRAINT.reset(token)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, length] arrays: rows split over (data, fsdp), columns over context (positions and segment
    ids travel with the tokens, so RoPE and the attention mask see global values)."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), (0, 0), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------------------
# Batches: each process holds a contiguous block of rows of every global batch.


def process_batch_block(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """(block index, number of blocks): this process's rows of a global batch are
    `[index * global_batch // count, (index + 1) * global_batch // count)`.

    Derived from the batch sharding itself, so it stays right whatever the device order; processes that
    hold the same rows (a tensor axis across hosts) get the same block.
    """
    sharding = batch_sharding(mesh)
    indices = sharding.addressable_devices_indices_map((global_batch, context_size(mesh)))
    starts = sorted({(idx[0].start or 0) for idx in indices.values()})
    stops = sorted({(idx[0].stop if idx[0].stop is not None else global_batch) for idx in indices.values()})
    lo, hi = starts[0], stops[-1]
    rows = hi - lo
    if global_batch % rows or lo % rows:
        raise UserError(f"this process's devices hold rows [{lo}, {hi}) of the batch, not an even block; "
                        "use a mesh whose data-parallel axes split evenly across processes")
    return lo // rows, global_batch // rows


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
    """This process's rows -> global jax.Arrays sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        shape = (global_batch_size, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out
