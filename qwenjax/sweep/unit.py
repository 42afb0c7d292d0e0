"""A unit of a sweep, trained in the process that received it (a local worker or a Ray task).

A *unit* is what one worker process trains in one go: a single run, a population group (runs that differ
only in their learning rate: `population.py` decides whether they train together), or a family (runs that
differ only in their token budget, longest first: with `fork_cooldowns` the first hands its state to the
others, which then train only their cooldown).

`worker_main` is the worker side of the local executor's protocol (`local.py`): units arrive as JSON lines
on stdin, events (`ready`, `started`, `result`, `unit_done`) leave as JSON lines on the original stdout, and
anything training prints goes to the worker's log. A local worker appends `ok`/`diverged` lines to
results.jsonl itself the moment a run ends, so a kill of the driver can never lose a finished run; a Ray
task returns its rows instead (`unit_rows`), and the driver appends them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable

from qwenjax import signals
from qwenjax.sweep.population import execute_population
from qwenjax.sweep.results import ResultsStore
from qwenjax.sweep.runner import RunFn, execute_run, resolve_run_fn, setup_jax


def execute_unit(unit: dict, run_fn: RunFn, emit: Callable[[dict], None], store: ResultsStore | None) -> None:
    """Train a unit; emit `started`/`result` events; append ok/diverged/interrupted rows to `store` if given.
    On SIGTERM/SIGINT the run in progress saves and is recorded `interrupted`, and the unit's remaining runs
    are not started (no row: the next invocation plans them again). A population, which does not
    checkpoint, leaves no rows either."""

    def finished(row: dict) -> None:
        appended = False
        if store is not None and row["status"] != "failed":
            store.append(row)
            appended = True
        emit({"event": "result", "row": row, "appended": appended})

    if unit["kind"] == "population" and len(unit["runs"]) > 1:
        try:
            execute_population(unit, run_fn, emit, finished)
        except signals.Interrupted:
            pass
        return
    # a family trains its longest run first, handing over its state to the rest, which then resume from it
    forks = [p["config"] for p in unit["runs"][1:]] if unit["kind"] == "family" else []
    for i, payload in enumerate(unit["runs"]):
        if signals.requested():
            return
        emit({"event": "started", "run_id": payload["row"]["run_id"]})
        row = execute_run(payload, run_fn, forks=forks if i == 0 else [])
        finished(row)
        if row["status"] == "interrupted":
            return


def unit_rows(unit: dict, out_dir: str, run_fn: str | None) -> list[dict]:
    """Train a unit in this process and return its result rows (the body of a Ray task)."""
    setup_jax(out_dir)
    rows: list[dict] = []

    def emit(event: dict) -> None:
        if event["event"] == "result":
            rows.append(event["row"])

    execute_unit(unit, resolve_run_fn(run_fn), emit, None)
    return rows


def worker_main(argv: list[str] | None = None) -> int:
    """A local worker: train the units sent on stdin until told to stop (`python -m qwenjax.sweep.worker`)."""
    p = argparse.ArgumentParser(prog="qwenjax-sweep-worker")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--run-fn", default=None)
    args = p.parse_args(argv)
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # protocol channel: the original stdout
    os.dup2(2, 1)  # anything training prints goes to the worker log
    setup_jax(args.out)
    run_fn = resolve_run_fn(args.run_fn)
    store = ResultsStore(args.out)
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            proto.write(json.dumps(event) + "\n")
            proto.flush()

    emit({"event": "ready", "pid": os.getpid()})
    with signals.stop_signals():  # the driver forwards SIGTERM/SIGINT: finish the step, save, stop
        for line in sys.stdin:
            if not line.strip():
                continue
            msg = json.loads(line)
            if msg.get("stop"):
                break
            unit = msg["unit"]
            execute_unit(unit, run_fn, emit, store)
            emit({"event": "unit_done", "unit_id": unit["id"]})
            if signals.requested():
                return 128 + signals.requested()
    return 0
