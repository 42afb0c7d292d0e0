"""`qwenjax plan`: will this run fit, and what will a step cost, before any accelerator is booked.

How: the real train step (`step.compiled_train_step`, the function `qwenjax train` runs, with its shardings
and donated state) is lowered and compiled for N simulated CPU devices from abstract inputs
(ShapeDtypeStructs: nothing is allocated). XLA's compiled memory analysis gives what one device holds, its
cost analysis the FLOPs, and the optimized HLO the collectives (`train/hlo.py`).

Caveats, also written into the JSON: XLA:CPU is not the TPU/GPU compiler (its fusion and buffer
assignment differ, and it computes bf16 matmuls in float32, so temporaries are an upper estimate);
cudnn/splash attention cannot lower on CPU, so the plan lowers `flash` (attention_flash.py: memory-linear
like them); XLA's cost analysis counts a while loop's
body once, so with scanned layers its FLOPs are about one layer's worth of the layer stack.

Devices: `jax_num_cpu_devices` must be set before JAX starts its backends. `host_devices(n)` does that
when they have not started; when they have (an interactive session, a test process) with fewer CPU
devices, the caller re-runs the command in a subprocess (`commands/plan.py`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
from jax._src import xla_bridge  # the public API has no "have the backends started" query

from qwenjax.config import flops_per_token, param_counts
from qwenjax.errors import UserError, did_you_mean
from qwenjax.run_config import RunConfig, model_config
from qwenjax.train import sharding, step
from qwenjax.train.hlo import collective_bytes
from qwenjax.train.metrics import PEAK_FLOPS
from qwenjax.train.setup import resolve_dtype

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str  # a device_kind key of train.metrics.PEAK_FLOPS (its bf16 peak)
    hbm: int  # bytes per chip
    cores_per_name_unit: int  # TPU v4/v5p names count TensorCores (2 per chip); others count chips


#: topology name prefix -> chip. `v5p-256` = 128 chips (one JAX device per chip), `v5e-16` = 16 chips.
CHIPS: dict[str, Chip] = {
    "v4": Chip("tpu v4", 32 * GIB, 2),
    "v5p": Chip("tpu v5p", 95 * GIB, 2),
    "v5e": Chip("tpu v5e", 16 * GIB, 1),
    "v6e": Chip("tpu v6", 32 * GIB, 1),
    "a100": Chip("a100", 80 * 10**9, 1),
    "h100": Chip("h100", 80 * 10**9, 1),
    "h200": Chip("h200", 141 * 10**9, 1),
    "b200": Chip("b200", 180 * 10**9, 1),
}
#: train.remat policies from most to least memory (offload needs pinned host memory, which CPU lacks)
REMAT_ORDER = ("none", "dots", "dots_with_no_batch_dims", "full")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'95GiB', '16GB', '80e9', '512 MiB' -> bytes; anything else: UserError."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--hbm: cannot read {text!r} as a size (examples: 95GiB, 16GB, 80e9)")
    return int(float(m.group(1)) * _UNITS[unit])


def topology(name: str) -> dict[str, Any]:
    """'v5p-256' -> {name, chip, chips, hbm_bytes, peak_bf16_flops}; unknown: UserError."""
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
    if not m or m.group(1) not in CHIPS or int(m.group(2)) < 1:
        family = m.group(1) if m else name
        raise UserError(f"unknown topology {name!r}: use FAMILY-COUNT with FAMILY one of {', '.join(CHIPS)} "
                        f"(e.g. v5p-256, v5e-16, h100-8){did_you_mean(family, CHIPS)}")
    chip, count = CHIPS[m.group(1)], int(m.group(2))
    if count % chip.cores_per_name_unit:
        raise UserError(f"unknown topology {name!r}: {m.group(1)} names count TensorCores "
                        f"({chip.cores_per_name_unit} per chip), so the number must be even")
    return {"name": name, "chip": chip.kind, "chips": count // chip.cores_per_name_unit, "hbm_bytes": chip.hbm,
            "peak_bf16_flops": dict(PEAK_FLOPS)[chip.kind]}


def resolve_mesh(cfg: RunConfig, devices: int) -> dict[str, int]:
    """mesh.data/fsdp/tensor (and mesh.context when > 1) for `devices` (one -1 = the rest); not dividing:
    UserError."""
    m = cfg.mesh
    shape = sharding.mesh_shape(m.data, m.fsdp, m.tensor, devices, m.context)
    return dict(zip(sharding.MESH_AXES, shape, strict=True)) | ({"context": m.context} if m.context > 1 else {})


def check_batch(batch: int, grad_accum: int, data_parallel: int) -> None:
    if batch % grad_accum or (batch // grad_accum) % data_parallel:
        raise UserError(f"train.batch_size ({batch}) / train.grad_accum ({grad_accum}) must be a whole number "
                        f"divisible by the data-parallel size mesh.data x mesh.fsdp = {data_parallel}")


def host_devices(n: int) -> bool:
    """Make JAX's CPU backend hold at least n devices if it has not started; whether it holds them now."""
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")  # a plan never touches the accelerator (and its memory)
        jax.config.update("jax_num_cpu_devices", n)
    return len(jax.devices("cpu")) >= n


def _attention(requested: str) -> dict[str, str]:
    """cudnn and splash cannot lower on CPU: `flash` (memory-linear, saves only the output and the
    log-sum-exp for the backward pass, as they do) stands in for them and for `auto`."""
    if requested in ("reference", "blockwise", "flash"):
        return {"requested": requested, "lowered": requested, "note": "the kernel the run would use"}
    note = ("cudnn and splash need their GPU/TPU; lowered flash, which like them keeps only the output and "
            "the log-sum-exp for the backward pass, so activations match in size, not in layout")
    if requested == "auto":
        note = "auto picks cudnn on a GPU, splash on a TPU; " + note
    return {"requested": requested, "lowered": "flash", "note": note}


def _shard_bytes(tree, shardings) -> int:
    leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in leaves)


def compile_candidate(cfg: RunConfig, mesh, remat: str, grad_accum: int, attention_impl: str) -> dict:
    """Compile the train step for one (remat, grad_accum) and read XLA's analyses (bytes per device)."""
    model_cfg = model_config(cfg)
    static = dataclasses.replace(step.make_step_static(cfg), remat=remat, grad_accum=grad_accum,
                                 attention_impl=attention_impl)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    t0 = time.perf_counter()
    try:
        compiled, _ = step.compiled_train_step(model_cfg, static, mesh, B, T)
    except Exception as e:  # e.g. a remat policy or kernel XLA:CPU cannot lower: one line, not a traceback
        raise UserError(f"plan: the step does not compile on CPU with train.remat={remat}, "
                        f"grad_accum={grad_accum}: {str(e).strip().splitlines()[0][:300]}") from None
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp",
                                                                   "generated_code")}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {"remat": remat, "grad_accum": grad_accum, "xla": xla, "compiled": compiled,
            "peak_bytes": xla["argument"] + xla["output"] - xla["alias"] + xla["temp"],
            "xla_flops": float((cost or {}).get("flops", float("nan"))), "compile_s": round(compile_s, 2)}


def _search(cfg, mesh, first: dict, hbm: int, attention_impl: str, dp: int, max_compiles: int) -> dict:
    """Full remat first (the most one compile can save). If it fits, the milder policies from there towards
    the config's, keeping the mildest that fits; if not, full remat with grad_accum doubled (the global
    batch kept, the micro-batch halved) until it fits. At most `max_compiles` compiles."""
    B, k = cfg.train.batch_size, first["grad_accum"]
    start = REMAT_ORDER.index(first["remat"]) if first["remat"] in REMAT_ORDER else 0
    milder = list(reversed(REMAT_ORDER[start + 1:-1]))
    tried: list[dict] = []

    def fits(remat: str, accum: int) -> bool:
        try:
            c = compile_candidate(cfg, mesh, remat, accum, attention_impl)
        except UserError as e:
            tried.append({"remat": remat, "grad_accum": accum, "error": str(e)})
            return False
        tried.append({"remat": remat, "grad_accum": accum, "micro_batch_per_replica": B // accum // dp,
                      "peak_bytes": c["peak_bytes"], "fits": c["peak_bytes"] <= hbm, "compile_s": c["compile_s"]})
        return tried[-1]["fits"]

    found = None
    if first["remat"] != "full" and fits("full", k):
        found = tried[-1]
        for remat in milder:
            if len(tried) >= max_compiles or not fits(remat, k):
                break
            found = tried[-1]
    else:
        while len(tried) < max_compiles and B % (2 * k) == 0 and (B // (2 * k)) % dp == 0:
            k *= 2
            if fits("full", k):
                found = tried[-1]
                break
    if found:
        found = {"overrides": [f"train.remat={found['remat']}", f"train.grad_accum={found['grad_accum']}"],
                 **found}
    return {"tried": tried, "fits_with": found, "max_compiles": max_compiles,
            "order": "full remat; if it fits, milder policies (" + " > ".join(REMAT_ORDER) + ") while they "
                     "fit; if not, full remat with grad_accum x2 (global batch kept)"}


def plan(cfg: RunConfig, devices: int, *, hbm: int | None = None, topo: dict | None = None,
         max_compiles: int = 6) -> dict[str, Any]:
    """The plan as one JSON-able dict (see docs/scaling-out.md for the fields)."""
    mesh_sizes = resolve_mesh(cfg, devices)
    dp = mesh_sizes["data"] * mesh_sizes["fsdp"]
    dtype_source = "model.dtype" if cfg.model.dtype is not None else (
        "model.dtype unset: bfloat16, as a run on a GPU/TPU resolves it (train.setup.resolve_dtype)")
    cfg = resolve_dtype(cfg, "gpu" if topo and not topo["chip"].startswith("tpu") else "tpu")
    B, T, k = cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum
    check_batch(B, k, dp)
    if not host_devices(devices):
        raise UserError(f"JAX already started with {len(jax.devices('cpu'))} CPU devices; plan needs {devices} "
                        "(run it as a fresh process)")
    mesh = sharding.make_mesh(**mesh_sizes, devices=jax.devices("cpu")[:devices])
    model_cfg = model_config(cfg)
    attention = _attention(cfg.attention.impl)
    first = compile_candidate(cfg, mesh, cfg.train.remat, k, attention["lowered"])

    abstract = step.abstract_state(model_cfg)
    state_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    params_b = _shard_bytes(abstract["params"], state_sh["params"])
    opt_b = _shard_bytes(abstract["opt_state"], state_sh["opt_state"])
    xla = first["xla"]
    memory = {
        "parameters": params_b, "optimizer_state": opt_b, "gradients": params_b,
        "activations": max(xla["temp"] - params_b, 0), "temporaries": xla["temp"], "peak": first["peak_bytes"],
        "xla": xla,
        "how": {
            "parameters": "shard shapes of the abstract params under their NamedShardings (step.abstract_state "
                          "+ sharding.state_shardings), x dtype bytes",
            "optimizer_state": "the same for the Adam moments (and the step counter)",
            "gradients": "equal to parameters: same shapes, dtypes and shardings; held inside XLA's temp",
            "activations": "XLA temp minus gradients: what the step keeps live besides the gradients "
                           "(activations saved for backward, logits, attention blocks); XLA reports one number",
            "temporaries": "compiled.memory_analysis().temp_size_in_bytes",
            "peak": "argument + output - alias + temp (donated state aliases its outputs)",
        },
    }
    total_n, _ = param_counts(model_cfg)
    ours = flops_per_token(model_cfg, T) * B * T
    flops = {"model_per_step": ours, "model_per_device": ours / devices, "xla_per_device": first["xla_flops"],
             "xla_over_model": first["xla_flops"] / (ours / devices) if ours else None,
             "how": "model: qwenjax.config.flops_per_token x tokens (causal half of attention, training = "
                    "3 x forward); xla: compiled.cost_analysis()['flops'] of one device's program"}
    if model_cfg.scanned or k > 1:
        flops["note"] = ("XLA's cost analysis counts a while loop's body once (scanned layers, grad "
                         "accumulation), so its number is far below the model's")
    if cfg.train.remat != "none":
        flops.setdefault("note", "")
        flops["note"] = (flops["note"] + "; " if flops["note"] else "") + "remat recomputes part of the forward"
    fits = None if hbm is None else first["peak_bytes"] <= hbm
    out: dict[str, Any] = {
        "config": {"params": total_n, "layers": model_cfg.num_hidden_layers, "hidden": model_cfg.hidden_size,
                   "dtype": model_cfg.dtype, "dtype_source": dtype_source,
                   "param_dtype": model_cfg.param_dtype,
                   "scan_layers": model_cfg.scanned, "remat": cfg.train.remat},
        "devices": devices, "mesh": mesh_sizes, "topology": topo,
        "batch": {"global_sequences": B, "seq_len": T, "grad_accum": k,
                  "micro_batch_per_replica": B // k // dp, "tokens_per_step": B * T,
                  "tokens_per_device": B * T / devices},
        "attention": attention, "memory_per_device": memory, "flops": flops,
        "collectives_per_step": {**collective_bytes(first["compiled"].as_text()),
                                 "how": "optimized HLO of one device: the larger of operand and result bytes "
                                        "per collective, while bodies x their known trip count"},
        "hbm_per_device": hbm, "fits": fits, "compile_s": first["compile_s"],
        "caveat": "compiled by XLA:CPU (bf16 matmuls in float32, CPU fusion and buffer assignment): "
                  "temporaries are an upper estimate of the TPU/GPU figure",
    }
    if topo:
        out["ideal_step_s"] = ours / (topo["peak_bf16_flops"] * devices)
    if fits is False and max_compiles > 0:
        out["search"] = _search(cfg, mesh, first, hbm, attention["lowered"], dp, max_compiles)
    return out
