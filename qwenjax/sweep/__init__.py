"""Learning-rate x batch-size sweeps over model size N and data size D.

The parts: `spec.py` (the YAML spec), `plan.py` (runs, ids, families), `adaptive.py` (grids centred on a
prior, extensions), `driver.py` (`run_sweep`: schedule, retry, summarise), `results.py` (results.jsonl and
which loss judges a row), `progress.py`, the executors (`local.py`, `ray_executor.py`), and what runs in a
training process: `unit.py` (one unit), `runner.py` (one run), `population.py` (populations of lrs),
`worker.py` (a local worker's entry point).

`run_sweep` and `SweepOptions` are imported on first use: a local worker imports this package and must pin
its cores before numpy or JAX start their threads (`worker.py`), and the light submodules (spec, results)
load without the driver.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"run_sweep": "qwenjax.sweep.driver", "SweepOptions": "qwenjax.sweep.driver"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwenjax.sweep' has no attribute {name!r}")
