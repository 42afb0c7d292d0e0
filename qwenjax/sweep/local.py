"""The local executor: K long-lived worker processes on this machine, fed units over stdin.

Each worker (`python -m qwenjax.sweep.worker`, which runs `unit.worker_main`) is pinned to its share of the
CPU cores (affinity, XLA intra-op threads, OpenMP threads) or of the GPUs. A worker lives for the whole
sweep, so runs of equal shape sent to it one after another reuse the step the trainer compiled in that
process; the driver keeps equal shapes on the same worker. Events come back as JSON lines on the worker's
stdout; a worker that dies with a unit in flight is reported as `unit_lost` and replaced on the next submit.

This module runs in the driver and imports neither JAX nor the trainer: only the workers do.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from qwenjax.errors import UserError


def cpu_slices(workers: int, cores: list[int] | None = None) -> list[list[int]]:
    """Disjoint core sets, one per worker (workers beyond the core count share round-robin)."""
    if cores is None:
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = sorted(cores)
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    per = len(cores) // workers
    return [cores[i * per:(i + 1) * per] for i in range(workers)]


def apply_thread_env() -> None:
    """Pin this process to the cores the driver gave it (`worker_env`): call it before numpy or JAX start
    their thread pools."""
    cores = os.environ.get("QWENJAX_WORKER_CORES")
    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
        except OSError:
            pass


def worker_env(cores: list[int], gpus: list[str] | None = None, base: dict | None = None) -> dict:
    """Environment of a worker with `cores` CPU cores: XLA and OpenMP use exactly that many threads."""
    env = dict(os.environ if base is None else base)
    threads = len(cores)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "multi_thread_eigen" not in f
             and "intra_op_parallelism_threads" not in f]
    if threads == 1:
        flags += ["--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"]
    env["XLA_FLAGS"] = " ".join(flags)
    env["OMP_NUM_THREADS"] = str(threads)
    env["QWENJAX_WORKER_CORES"] = ",".join(map(str, cores))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g for g in visible.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU")]


class Slot:
    """One place a unit can run (a worker process, a Ray task in flight), and the shape it ran last."""

    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.unit: dict | None = None
        self.last_shape: str | None = None
        self.ready = False


class LocalExecutor:
    """K long-lived worker processes fed units over stdin; events come back as JSON lines on stdout."""

    appends_results = True

    def __init__(self, out_dir: str | os.PathLike, workers: int, *, run_fn: str | None = None,
                 resources: dict | None = None):
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        self.out_dir = Path(out_dir)
        self.workers = workers
        self.run_fn = run_fn
        self.events: queue.Queue = queue.Queue()
        self.slots = [Slot(i) for i in range(workers)]
        self._cores = cpu_slices(workers)
        if (resources or {}).get("TPU") and workers > 1:
            raise UserError("the local executor cannot split TPU chips between worker processes; use "
                            "--workers 1 or --executor ray")
        gpus_per = (resources or {}).get("GPU")
        self._gpus: list[list[str]] | None = None
        if gpus_per:
            visible = _visible_gpus()
            per = int(gpus_per)
            if len(visible) < per * workers:
                raise UserError(f"{workers} workers x {per} GPU need {per * workers} GPUs, "
                                f"{len(visible)} visible")
            self._gpus = [visible[i * per:(i + 1) * per] for i in range(workers)]
        (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        threads = ", ".join(str(len(c)) for c in self._cores)
        return f"local: {self.workers} worker process(es), CPU threads per worker [{threads}]"

    def _spawn(self, slot: Slot) -> None:
        log = open(self.out_dir / "logs" / f"worker-{slot.index}.log", "ab")
        cmd = [sys.executable, "-m", "qwenjax.sweep.worker", "--worker", "--out", str(self.out_dir)]
        if self.run_fn:
            cmd += ["--run-fn", self.run_fn]
        env = worker_env(self._cores[slot.index], self._gpus[slot.index] if self._gpus else None)
        slot.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                     text=True, bufsize=1)
        log.close()
        slot.ready = False
        proc = slot.proc

        def reader() -> None:
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                self.events.put((slot.index, proc, event))
            proc.wait()
            self.events.put((slot.index, proc, {"event": "exit", "returncode": proc.returncode}))

        threading.Thread(target=reader, daemon=True).start()

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.unit is None]

    def submit(self, slot: Slot, unit: dict) -> None:
        if slot.proc is None or slot.proc.poll() is not None:
            self._spawn(slot)
        slot.unit = unit
        slot.last_shape = unit["shape_key"]
        slot.proc.stdin.write(json.dumps({"unit": unit}) + "\n")
        slot.proc.stdin.flush()

    def poll(self, timeout: float) -> list[dict]:
        """Events since the last call (waits up to `timeout` for the first)."""
        out = []
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            return out
        while True:
            index, proc, event = item
            slot = self.slots[index]
            if proc is slot.proc:  # ignore stragglers of a replaced process
                if event["event"] == "unit_done":
                    event["unit"], slot.unit = slot.unit, None
                elif event["event"] == "exit":
                    if slot.unit is not None:  # died with work in flight
                        out.append({"event": "unit_lost", "unit": slot.unit,
                                    "reason": f"worker {index} exited with code {event['returncode']} "
                                              f"(see logs/worker-{index}.log)"})
                    slot.unit, slot.proc, slot.last_shape = None, None, None
                    event = None
                if event is not None:
                    out.append(event)
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                return out

    def interrupt(self, signum: int) -> None:
        """Forward a signal to the workers: each finishes its step, checkpoints and reports `interrupted`."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                try:
                    slot.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                try:
                    slot.proc.stdin.write(json.dumps({"stop": True}) + "\n")
                    slot.proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + 30
        for slot in self.slots:
            if slot.proc is not None:
                try:
                    slot.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    slot.proc.kill()
