"""The Ray executor: each unit of a sweep is a Ray task, on an existing cluster (`--ray-address` /
`RAY_ADDRESS`) or on a local instance, with the spec's per-task resources and `max_retries` for lost workers.

Ray is an optional dependency (`pip install 'qwenjax[ray]'`): it is imported only when a Ray executor is
made, so the package and the local executor work without it. A Ray worker may not share this machine's view
of results.jsonl, so a task returns its rows and the driver appends them.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from qwenjax.errors import UserError, one_line
from qwenjax.sweep.local import Slot


def _ray_task(unit: dict, out_dir: str, run_fn: str | None) -> list[dict]:
    """Body of a Ray task: train the unit in the Ray worker process and return its rows."""
    from qwenjax.sweep.unit import unit_rows  # in the Ray worker only: the driver never imports JAX

    return unit_rows(unit, out_dir, run_fn)


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast with one line when a Ray address does not answer (ray.init would retry for minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address {address!r} must look like HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"Ray cluster at {address} does not answer ({e.strerror or e}); start it with "
                        f"`ray start --head` or fix --ray-address / RAY_ADDRESS") from None


def ray_options(resources: dict, max_retries: int) -> dict:
    """Per-task Ray options from the spec's `resources` ({CPU: 2} / {GPU: 1} / {TPU: 4} / custom)."""
    res = dict(resources or {"CPU": 1})
    opts: dict[str, Any] = {"num_cpus": res.pop("CPU", 1), "max_retries": max_retries,
                            "retry_exceptions": False}
    if "GPU" in res:
        opts["num_gpus"] = res.pop("GPU")
    if "memory" in res:
        opts["memory"] = res.pop("memory")
    if res:
        opts["resources"] = res
    threads = max(1, int(opts["num_cpus"] or 1))
    env = {"OMP_NUM_THREADS": str(threads)}
    if threads == 1 and not opts.get("num_gpus") and "TPU" not in opts.get("resources", {}):
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    for name in ("QWENJAX_CACHE", "QWENJAX_SWEEP_JAX_CACHE", "QWENJAX_COMPILATION_CACHE"):
        if os.environ.get(name):  # the token / compilation caches this driver uses, for the Ray workers
            env[name] = os.environ[name]
    opts["runtime_env"] = {"env_vars": env}
    return opts


class RayExecutor:
    """Each unit a Ray task; at most `workers` in flight (default: as many as the cluster can hold)."""

    appends_results = False

    def __init__(self, out_dir: str | os.PathLike, *, address: str | None, resources: dict, max_retries: int,
                 workers: int | None = None, run_fn: str | None = None, num_cpus: int | None = None):
        try:
            import ray  # optional and slow to import: only when a Ray executor is made
        except ImportError:
            raise UserError("the ray executor needs Ray: pip install 'qwenjax[ray]'") from None
        self.ray = ray
        self.out_dir = Path(out_dir).resolve()
        self.run_fn = run_fn
        address = address or os.environ.get("RAY_ADDRESS") or None
        self.owns_instance = False
        if not ray.is_initialized():
            if address:
                check_ray_address(address)
                try:
                    ray.init(address=address, log_to_driver=False)
                except (ConnectionError, RuntimeError, TimeoutError) as e:
                    raise UserError(f"cannot connect to the Ray cluster at {address}: "
                                    f"{one_line(e)}") from None
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
                self.owns_instance = True
        self.address = address or "local instance"
        self.options = ray_options(resources, max_retries)
        self._task = ray.remote(_ray_task).options(**self.options)
        per_task = max(float(self.options["num_cpus"] or 0), 1e-9)
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, int(cluster_cpus // per_task))
        self.in_flight: dict[Any, dict] = {}
        self.slots = [Slot(i) for i in range(self.workers)]
        self._pending_events: list[dict] = []

    def describe(self) -> str:
        return (f"ray ({self.address}): up to {self.workers} task(s) in flight, "
                f"per task {self.options['num_cpus']} CPU")

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.unit is None]

    def submit(self, slot: Slot, unit: dict) -> None:
        slot.unit = unit
        slot.last_shape = unit["shape_key"]
        ref = self._task.remote(unit, str(self.out_dir), self.run_fn)
        self.in_flight[ref] = {"slot": slot, "unit": unit}
        # Ray does not report when a task starts; count the unit's runs as running from submission
        for payload in unit["runs"]:
            self._pending_events.append({"event": "started", "run_id": payload["row"]["run_id"]})

    def poll(self, timeout: float) -> list[dict]:
        out, self._pending_events = self._pending_events, []
        if not self.in_flight:
            if not out:
                time.sleep(min(timeout, 0.05))
            return out
        ready, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=0 if out else timeout)
        if ready:  # collect everything else that is done too
            more, _ = self.ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=0)
            ready = list(dict.fromkeys(ready + more))
        for ref in ready:
            info = self.in_flight.pop(ref)
            slot, unit = info["slot"], info["unit"]
            slot.unit = None
            try:
                rows = self.ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a lost worker (after Ray's retries) or a crash
                out.append({"event": "unit_lost", "unit": unit, "reason": one_line(e)})
                continue
            for row in rows:
                out.append({"event": "result", "row": row, "appended": False})
            out.append({"event": "unit_done", "unit": unit})
        return out

    def close(self) -> None:
        for ref in list(self.in_flight):
            self.ray.cancel(ref, force=True)
        if self.owns_instance:
            self.ray.shutdown()
