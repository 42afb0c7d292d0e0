"""Executors: where and how the runs of a sweep are trained.

A *unit* is what one worker process trains in one go: a single run, a population group (runs that
differ only in their learning rate), or a family (runs that differ only in their token budget, longest
first: with `fork_cooldowns` the first hands its state to the others, which then train only their
cooldown). The driver (`qwenjax.sweep.run_sweep`) decides the order; the executors here only move units to
processes and results back:

- `LocalExecutor`: K worker processes on this machine (`python -m qwenjax.sweep.executors --worker`), each
  pinned to its share of the CPU cores (affinity, XLA intra-op threads, OMP threads) or of the GPUs. A
  worker lives for the whole sweep, so runs of equal shape sent to it one after another reuse the step the
  trainer compiled in that process; the driver keeps equal shapes on the same worker.
- `RayExecutor`: each unit is a Ray task on an existing cluster (`--ray-address` / `RAY_ADDRESS`) or a local
  instance, with the spec's per-run resources and `max_retries` for lost workers.

Both enable JAX's persistent compilation cache in `DIR/.jax_cache`, so a new process (a restarted sweep, a
Ray worker) loads a compiled step instead of compiling it again, and both measure compile time per run from
JAX's monitoring events.

Who writes results.jsonl: a local worker appends `ok`/`diverged` lines itself the moment a run ends (a
kill of the driver can then never lose a finished run); failed attempts go to the driver, which retries
them or appends the final failure. Ray tasks return their rows to the driver, which appends them (a Ray
worker may not share this machine's filesystem view of results.jsonl); a run finished but unrecorded when
the driver died is recovered from its run directory's `summary.json` without training again.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenjax.errors import UserError
from qwenjax.sweep.results import ResultsStore, now_iso

RunFn = Callable[[Any], dict]
DEFAULT_RUN_FN = "qwenjax.train:train"
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


# ---------------------------------------------------------------------------------------------------------
# In the process that trains: JAX setup, compile clock, one run, one unit


class CompileClock:
    """Seconds this process spent tracing, lowering and compiling (or loading compiled programs from the
    persistent cache), summed from JAX's monitoring events; `read()` differences give per-run figures."""

    _installed = False
    total = 0.0

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        from jax import monitoring

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
    import jax

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


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:500] if text else type(e).__name__


def result_row(payload: dict, summary: dict | None, *, wall_s: float, compile_s: float | None, mode: str,
               error: str | None = None, recovered: bool = False) -> dict:
    """A complete result line: the planned fields plus what the run reported."""
    row = dict(payload["row"])
    summary = summary or {}
    diverged = bool(summary.get("diverged", False))
    status = "failed" if error else "diverged" if diverged else "ok"
    row.update(
        final_loss=summary.get("final_loss"), eval_loss=summary.get("eval_loss"), diverged=diverged,
        status=status, wall_s=round(float(summary.get("wall_s", wall_s) if recovered else wall_s), 3),
        compile_s=None if compile_s is None else round(float(compile_s), 3), mode=mode, finished_at=now_iso(),
    )
    for key in ("diverged_step", "diverged_at", "steps_done"):
        if key in summary:
            row[key] = summary[key]
    if summary.get("fork_of"):  # started from a longer run's state (the trainer's record): that run's id
        row.update(fork_of=Path(summary["fork_of"]).name, fork_step=summary["fork_step"])
    if error:
        row["error"] = error
    if recovered:
        row["recovered"] = True
    return row


def recover_finished(payload: dict) -> dict | None:
    """The row of a run that finished (summary.json written) but was not recorded: the sweep was killed
    between the two. Only trusted when the run directory's config is this run's config."""
    run_dir = Path(payload["config"]["run_dir"])
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary_path.is_file() or not config_path.is_file():
        return None
    try:
        import yaml

        summary = json.loads(summary_path.read_text())
        saved = yaml.safe_load(config_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or "final_loss" not in summary or saved != payload["config"]:
        return None
    if summary.get("finished") is False:
        return None
    return result_row(payload, summary, wall_s=float(summary.get("wall_s") or 0.0),
                      compile_s=summary.get("compile_s"), mode=summary.get("mode", "solo"), recovered=True)


def execute_run(payload: dict, run_fn: RunFn, *, mode: str = "solo", forks: list[dict] = ()) -> dict:
    """Train one run (or recover it) and return its result row; exceptions become a `failed` row.
    `forks`: configs (as dicts) of shorter runs this one hands its state to (`qwenjax.train.train`)."""
    recovered = recover_finished(payload)
    if recovered is not None:
        return recovered
    from qwenjax.run_config import config_from_dict

    t0, c0 = time.perf_counter(), CompileClock.read()
    try:
        cfg = config_from_dict(payload["config"])
        summary = run_fn(cfg, forks=[config_from_dict(f) for f in forks]) if forks else run_fn(cfg)
        error = None
    except Exception as e:  # noqa: BLE001 - a failed run must not stop the sweep
        traceback.print_exc()
        summary, error = None, _one_line(e)
    wall = time.perf_counter() - t0
    compile_s = CompileClock.read() - c0 if CompileClock._installed else (summary or {}).get("compile_s")
    return result_row(payload, summary, wall_s=wall, compile_s=compile_s, mode=mode, error=error)


def execute_unit(unit: dict, run_fn: RunFn, emit: Callable[[dict], None], store: ResultsStore | None) -> None:
    """Train a unit; emit `started`/`result` events; append ok/diverged rows to `store` if given."""

    def finished(row: dict) -> None:
        appended = False
        if store is not None and row["status"] != "failed":
            store.append(row)
            appended = True
        emit({"event": "result", "row": row, "appended": appended})

    if unit["kind"] == "population" and len(unit["runs"]) > 1:
        from qwenjax.sweep.population import execute_population

        execute_population(unit, run_fn, emit, finished)
        return
    # a family trains its longest run first, handing over its state to the rest, which then resume from it
    forks = [p["config"] for p in unit["runs"][1:]] if unit["kind"] == "family" else []
    for i, payload in enumerate(unit["runs"]):
        emit({"event": "started", "run_id": payload["row"]["run_id"]})
        finished(execute_run(payload, run_fn, forks=forks if i == 0 else []))


# ---------------------------------------------------------------------------------------------------------
# Worker process (local executor)


def _apply_thread_env() -> None:
    """Pin this process to the cores the driver gave it (before JAX creates its thread pools)."""
    cores = os.environ.get("QWENJAX_WORKER_CORES")
    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
        except OSError:
            pass


def worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwenjax-sweep-worker")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--run-fn", default=None)
    args = p.parse_args(argv)
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # protocol channel: the original stdout
    os.dup2(2, 1)  # anything training prints goes to the worker log
    _apply_thread_env()
    setup_jax(args.out)
    run_fn = resolve_run_fn(args.run_fn)
    store = ResultsStore(args.out)
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            proto.write(json.dumps(event) + "\n")
            proto.flush()

    emit({"event": "ready", "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg.get("stop"):
            break
        unit = msg["unit"]
        execute_unit(unit, run_fn, emit, store)
        emit({"event": "unit_done", "unit_id": unit["id"]})
    return 0


def cpu_slices(workers: int, cores: list[int] | None = None) -> list[list[int]]:
    """Disjoint core sets, one per worker (workers beyond the core count share round-robin)."""
    if cores is None:
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = sorted(cores)
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    per = len(cores) // workers
    return [cores[i * per:(i + 1) * per] for i in range(workers)]


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


class _Slot:
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
        self.slots = [_Slot(i) for i in range(workers)]
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

    def _spawn(self, slot: _Slot) -> None:
        log = open(self.out_dir / "logs" / f"worker-{slot.index}.log", "ab")
        cmd = [sys.executable, "-m", "qwenjax.sweep.executors", "--worker", "--out", str(self.out_dir)]
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

    def free_slots(self) -> list[_Slot]:
        return [s for s in self.slots if s.unit is None]

    def submit(self, slot: _Slot, unit: dict) -> None:
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


# ---------------------------------------------------------------------------------------------------------
# Ray


def _ray_task(unit: dict, out_dir: str, run_fn: str | None) -> list[dict]:
    """Body of a Ray task: train the unit in the Ray worker process and return its rows."""
    setup_jax(out_dir)
    rows: list[dict] = []

    def emit(event: dict) -> None:
        if event["event"] == "result":
            rows.append(event["row"])

    execute_unit(unit, resolve_run_fn(run_fn), emit, None)
    return rows


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
            import ray
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
                                    f"{_one_line(e)}") from None
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
        self.slots = [_Slot(i) for i in range(self.workers)]
        self._pending_events: list[dict] = []

    def describe(self) -> str:
        return (f"ray ({self.address}): up to {self.workers} task(s) in flight, "
                f"per task {self.options['num_cpus']} CPU")

    def free_slots(self) -> list[_Slot]:
        return [s for s in self.slots if s.unit is None]

    def submit(self, slot: _Slot, unit: dict) -> None:
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
                out.append({"event": "unit_lost", "unit": unit, "reason": _one_line(e)})
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


if __name__ == "__main__":
    # run the worker from the imported module, not from __main__: population.py imports this module, and
    # two copies would mean two CompileClocks (one never installed)
    from qwenjax.sweep.executors import worker_main as _worker_main

    sys.exit(_worker_main())
