"""Entry point of a local worker process: `python -m qwenjax.sweep.worker --worker --out DIR [--run-fn M:F]`.

The process pins itself to the cores the driver gave it before anything that starts threads (numpy's BLAS,
JAX's thread pools) is imported: threads inherit the affinity of the thread that creates them. So this
module imports only the light `local.py` at the top and the trainer after pinning.
"""

from __future__ import annotations

import sys

from qwenjax.sweep.local import apply_thread_env

if __name__ == "__main__":
    apply_thread_env()
    from qwenjax.sweep.unit import worker_main  # after pinning: see the module docstring

    sys.exit(worker_main())
