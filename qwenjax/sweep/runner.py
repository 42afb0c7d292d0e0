"""One run of a sweep in the process that trains it: JAX's persistent compilation cache, the compile clock,
the run function, and the run's result row.

Used by the units (`unit.py`) and by population units (`population.py`, which falls back to solo runs), so
it sits below both: neither imports the other through here. Only training processes import this module
(a local worker, a Ray task); the driver never does, so `qwenjax sweep` starts without JAX.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax import monitoring

from qwenjax.errors import one_line
from qwenjax.run_config import config_from_dict
from qwenjax.signals import Interrupted
from qwenjax.sweep.results import recover_finished, result_row

RunFn = Callable[[Any], dict]
DEFAULT_RUN_FN = "qwenjax.train:train"
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """Seconds this process spent tracing, lowering and compiling (or loading compiled programs from the
    persistent cache), summed from JAX's monitoring events; `read()` differences give per-run figures."""

    _installed = False
    total = 0.0

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return

        def listener(event: str, duration: float, **_: Any) -> None:
            if event in COMPILE_EVENTS:
                cls.total += float(duration)

        monitoring.register_event_duration_secs_listener(listener)
        cls._installed = True

    @classmethod
    def read(cls) -> float:
        return cls.total


def setup_jax(out_dir: str | os.PathLike) -> None:
    """Persistent compilation cache in DIR/.jax_cache with every entry kept (no size / time threshold),
    plus the compile clock. Idempotent; must run before the first compilation of the process."""
    # QWENJAX_SWEEP_JAX_CACHE: one cache for several sweep folders (the tests share one between sweeps)
    cache = Path(os.environ.get("QWENJAX_SWEEP_JAX_CACHE") or Path(out_dir).resolve() / ".jax_cache")
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # -1: cache entries of every size and let no backend default raise the threshold (0 would allow that)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    CompileClock.install()


def resolve_run_fn(spec: str | None) -> RunFn:
    """'module:function' -> the function (the trainer by default; tests pass a fake)."""
    module, _, name = (spec or DEFAULT_RUN_FN).partition(":")
    return getattr(importlib.import_module(module), name)


def execute_run(payload: dict, run_fn: RunFn, *, mode: str = "solo", forks: list[dict] = ()) -> dict:
    """Train one run (or recover it) and return its result row; exceptions become a `failed` row, a stop on
    a signal (the trainer saved a checkpoint) an `interrupted` one.
    `forks`: configs (as dicts) of shorter runs this one hands its state to (`qwenjax.train.train`)."""
    recovered = recover_finished(payload)
    if recovered is not None:
        return recovered
    t0, c0 = time.perf_counter(), CompileClock.read()
    try:
        cfg = config_from_dict(payload["config"])
        summary = run_fn(cfg, forks=[config_from_dict(f) for f in forks]) if forks else run_fn(cfg)
        error = None
    except Interrupted as e:
        wall = time.perf_counter() - t0
        return result_row(payload, None, wall_s=wall, compile_s=None, mode=mode, error=str(e), interrupted=True)
    except Exception as e:  # noqa: BLE001 - a failed run must not stop the sweep
        traceback.print_exc()
        summary, error = None, one_line(e)
    wall = time.perf_counter() - t0
    compile_s = CompileClock.read() - c0 if CompileClock._installed else (summary or {}).get("compile_s")
    return result_row(payload, summary, wall_s=wall, compile_s=compile_s, mode=mode, error=error)
