"""Run metrics: `metrics.jsonl` (append-only), TensorBoard events, optional wandb, progress output, MFU.

Every logged step appends one JSON object `{step, loss, lr, grad_norm, tokens, tokens_per_s, mfu}` (+
`eval_loss` on eval steps) as a single line, flushed and fsynced, so a killed run leaves at worst one
partial last line, which `read_metrics` skips. On resume the lines after the restored step are dropped.

MFU = model FLOPs actually achieved (`qwenjax.config.flops_per_token` x tokens/s, training = 3 x forward)
over the peak of the devices: from a table of dense peaks per TPU/GPU chip for the model's compute dtype
(`PEAKS`), or on CPU from a float32 matmul measured once per process (there is no meaningful spec sheet for
a shared CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from qwenjax.jsonl import atomic_write_text
from qwenjax.jsonl import read as read_metrics  # the metrics file's reader (a torn last line is skipped)

log = logging.getLogger(__name__)

# Dense peak FLOP/s per JAX device: (bfloat16, float32 as JAX runs a float32 matmul by default), keyed by a
# lowercase substring of `jax.devices()[0].device_kind`; the longest matching key wins ("tpu v5 lite" over
# "tpu v5", "gh200" over "h200", "a100" over "a10"). TPUs run default-precision float32 matmuls as one bf16
# pass, so both columns are equal there; NVIDIA GPUs from Ampere on use TF32 tensor cores (half the bf16
# rate), V100 has no TF32. TPU v2/v3 expose one device per core, later generations one per chip.
PEAKS: dict[str, tuple[float, float]] = {
    "tpu v6": (918e12, 918e12),  # v6e (Trillium): device_kind "TPU v6 lite"
    "tpu v5p": (459e12, 459e12),
    "tpu v5 lite": (197e12, 197e12),  # v5e
    "tpu v5e": (197e12, 197e12),
    "tpu v5": (459e12, 459e12),  # v5p reports "TPU v5"
    "tpu v4": (275e12, 275e12),
    "tpu v3": (61.5e12, 61.5e12),
    "tpu v2": (22.5e12, 22.5e12),
    "gb200": (2500e12, 1250e12),
    "b200": (2250e12, 1100e12),
    "gh200": (989e12, 494e12),
    "h200": (989e12, 494e12),
    "h100": (989e12, 494e12),  # SXM
    "h100 pcie": (756e12, 378e12),
    "a100": (312e12, 156e12),
    "l40s": (362e12, 183e12),
    "l4": (121e12, 60e12),
    "a10": (125e12, 62.5e12),
    "v100": (125e12, 15.7e12),  # fp16 tensor cores (no bf16, no TF32)
}
#: the bf16 column alone, as (key, FLOP/s) pairs (what `qwenjax plan` reads)
PEAK_FLOPS: tuple[tuple[str, float], ...] = tuple((k, bf16) for k, (bf16, _) in PEAKS.items())


def table_peak(device_kind: str, dtype: str = "bfloat16") -> tuple[str, float] | None:
    """(matched key, peak FLOP/s of one device) for a device_kind and compute dtype (float32: the second
    column; bfloat16 and float16: the first), or None when no key matches."""
    kind = device_kind.lower()
    keys = [k for k in PEAKS if k in kind]
    if not keys:
        return None
    key = max(keys, key=len)
    return key, PEAKS[key][1 if dtype == "float32" else 0]


_CPU_PEAK: float | None = None


def cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul on the first CPU device (best of `repeats`), measured once."""
    global _CPU_PEAK
    if _CPU_PEAK is None:
        device = jax.local_devices(backend="cpu")[0]
        a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK = 2 * n**3 / best
    return _CPU_PEAK


def peak_flops(devices=None, dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of all `devices` together for matmuls in `dtype` (the model's compute dtype), where the
    number comes from).

    QWENJAX_PEAK_FLOPS (per device) overrides. On CPU, all local CPU devices share the same cores, so the
    peak is one measured float32 matmul per process, not per device. An unknown accelerator gives NaN (the
    MFU is then null) and says so.
    """
    devices = list(devices if devices is not None else jax.devices())
    override = os.environ.get("QWENJAX_PEAK_FLOPS")
    if override:
        return float(override) * len(devices), "QWENJAX_PEAK_FLOPS"
    if devices[0].platform == "cpu":
        processes = len({d.process_index for d in devices})
        per_process = cpu_matmul_flops()
        source = f"measured CPU float32 matmul, {per_process / 1e9:.1f} GFLOP/s per process"
        return per_process * processes, source
    row = table_peak(devices[0].device_kind, dtype)
    if row is None:
        return math.nan, f"unknown device kind {devices[0].device_kind!r} (set QWENJAX_PEAK_FLOPS)"
    key, flops = row
    source = f"table: {devices[0].device_kind} ({key}, {dtype}), {flops / 1e12:g} TFLOP/s x {len(devices)}"
    return flops * len(devices), source


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch (if installed) only
    to accept torch tensors, which costs seconds per process. torch stays importable afterwards."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter  # optional dependency

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter  # optional dependency
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl


def truncate_metrics(path: str | Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the records with step <= last_step (atomic rewrite); returns them. Used on resume."""
    path = Path(path)
    records = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    if path.exists():
        write_metrics(path, records)
    return records


def write_metrics(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace a metrics file with `records` atomically (a kill leaves the old file or the new one)."""
    atomic_write_text(path, "".join(json.dumps({k: _finite(v) for k, v in r.items()}) + "\n" for r in records))


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else x
    return x


def wandb_enabled(switch: str = "auto", asked: bool = False) -> bool:
    """The run config's `train.wandb` switch: "true" / "false" decide; "auto" logs to wandb when the caller
    asks (`asked`) or the environment variable QWENJAX_WANDB is 1, true or yes."""
    if switch != "auto":
        return switch == "true"
    return asked or os.environ.get("QWENJAX_WANDB", "").lower() in ("1", "true", "yes")


class MetricsLogger:
    """Writes metrics of process 0 (other processes get a no-op logger: `enabled=False`)."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, wandb_config: dict | None = None, progress: bool | None = None,
                 wandb: str = "auto"):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a")
        if tensorboard:
            try:
                SummaryWriter = _summary_writer_class()
                purge = start_step + 1 if start_step else None  # drop events after the restored step
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)
            except ImportError:
                log.info("tensorboardX not installed: no TensorBoard events")
        if wandb_enabled(wandb, wandb_config is not None):
            try:
                import wandb as wandb_module  # optional dependency
            except ImportError:
                why = "train.wandb is true" if wandb == "true" else "QWENJAX_WANDB is set"
                log.warning("%s but wandb is not installed (pip install wandb): no wandb logging", why)
            else:
                self._wandb = wandb_module.init(project=os.environ.get("WANDB_PROJECT", "qwenjax"),
                                                name=self.run_dir.name, dir=str(self.run_dir), resume="allow",
                                                config=wandb_config or {})
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm  # only with a progress bar (an interactive terminal)

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _finite(v) for k, v in record.items()}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        step = int(record["step"])
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        line = format_record(record)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(line.partition(" | ")[2], refresh=True)
        else:
            log.info("%s", line)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            log.info("%s", text)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_record(r: dict[str, Any]) -> str:
    def num(k, fmt):
        v = r.get(k)
        return "nan" if v is None else format(v, fmt)

    parts = [f"step {r['step']}", f"loss {num('loss', '.4f')}"]
    if "eval_loss" in r:
        parts.append(f"eval_loss {num('eval_loss', '.4f')}")
    parts += [f"lr {num('lr', '.3e')}", f"grad_norm {num('grad_norm', '.3f')}",
              f"tokens/s {num('tokens_per_s', ',.0f')}", f"mfu {num('mfu', '.1%')}"]
    return " | ".join(parts)
