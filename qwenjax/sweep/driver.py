"""The sweep driver: plan, skip what is done, schedule units on an executor, retry, extend, summarise.

`run_sweep(spec, out_dir, ...)` plans the runs of a spec (`spec.py`, `plan.py`), skips those already in
`DIR/results.jsonl` (`results.py`), sends the rest in units to an executor (`local.py`: worker processes on
this machine; `ray_executor.py`: Ray tasks; what a unit does in its process: `unit.py`), retries failures,
extends the grid of any cell whose optimum sits on its edge (`adaptive.py`), shows progress (`progress.py`)
and writes `DIR/summary.json`. Everything it needs to resume is on disk, so rerunning the same command after
a kill continues where the sweep stopped. The driver imports no JAX: only the processes that train do.

Scheduling: runs of equal shape compile to the same step, so a worker that has just trained a shape gets
another run of that shape next; a free worker with none left takes the shape with the most work left.
With `fork_cooldowns`, the pending runs of a family (equal but for their token budget) are one unit: its
worker trains the longest first, which hands its state to the others at their decay starts, then the others,
which resume from there; families therefore run solo, and `population: lr` only groups runs without family.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

from qwenjax import jsonl, signals
from qwenjax.errors import UserError
from qwenjax.lock import DirLock
from qwenjax.run_config import config_to_dict
from qwenjax.scaling.noise import noise_floor
from qwenjax.scaling.results import load_results
from qwenjax.sweep.local import LocalExecutor
from qwenjax.sweep.plan import Planner, families, fork_plan, trained_share
from qwenjax.sweep.progress import Progress
from qwenjax.sweep.ray_executor import RayExecutor
from qwenjax.sweep.results import ResultsStore, result_row, row_loss
from qwenjax.sweep.spec import load_spec, spec_dict

__all__ = ["run_sweep", "SweepOptions"]


@dataclasses.dataclass
class SweepOptions:
    executor: str = "local"  # local | ray
    workers: int | None = None  # local: processes (default 1); ray: max tasks in flight (default: cluster)
    max_retries: int = 1
    ray_address: str | None = None
    run_fn: str | None = None  # "module:function" (default: qwenjax.train:train); tests inject fakes
    live: bool | None = None  # progress as a live table (default: when stderr is a terminal)
    ray_num_cpus: int | None = None  # CPUs of a local Ray instance (default: all)
    population_probe_steps: int = 5
    force_population: str | None = None  # "population" | "solo": skip the probe (tests, benchmarks)


def _payload(run, sweep_name: str) -> dict:
    return {"config": config_to_dict(run.cfg), "row": run.row(sweep_name)}


class _Driver:
    def __init__(self, spec, out_dir: Path, opts: SweepOptions):
        self.spec, self.out_dir, self.opts = spec, out_dir, opts
        self.planner = Planner(spec, out_dir)
        self.store = ResultsStore(out_dir)
        self.runs: dict[str, object] = {}  # run_id -> PlannedRun (all planned so far)
        self.cell_runs: dict[tuple, list[str]] = defaultdict(list)
        self.cell_rounds: dict[tuple, int] = defaultdict(int)
        self.cell_closed: set[tuple] = set()
        self.noise_planned: set[tuple] = set()
        self.rows: dict[str, dict] = {}  # run_id -> latest final row (ok/diverged/failed)
        self.pending: list[str] = []  # run ids waiting for a worker
        self.attempts: dict[str, int] = defaultdict(int)
        self.unit_ids = itertools.count()
        self.new_rows: list[dict] = []  # rows finished in this invocation
        self.interrupted: list[dict] = []  # runs stopped by a signal in this invocation (saved, not finished)
        self.lost_units = 0

    # -- planning -------------------------------------------------------------------------------------
    def add_runs(self, runs, progress) -> None:
        for r in runs:
            if r.run_id in self.runs:
                continue
            self.runs[r.run_id] = r
            self.cell_runs[r.cell].append(r.run_id)
            progress.add_planned(r.run_id, r.flops)
            prev = self.previous.get(r.run_id)
            if prev is not None and prev.get("status") in ("ok", "diverged"):
                self.rows[r.run_id] = prev
                progress.skipped(prev)
            else:
                self.pending.append(r.run_id)

    def advance_cell(self, cell, progress) -> None:
        """When every run of a cell has a final row: extend its grid, or (once) rerun the best point of its grid
        with the spec's `noise_seeds`, or close it. The seed means can flatten an edge, so the brackets are
        checked again after the noise runs (extensions stay bounded by max_extensions); the noise seeds are
        not chased to another point, which a lucky single-seed run would always win."""
        while cell not in self.cell_closed:
            ids = self.cell_runs[cell]
            if any(rid not in self.rows for rid in ids):
                return
            rows = [self.rows[i] for i in ids]
            new = []
            if self.cell_rounds[cell] < self.spec.max_extensions:
                new = [r for r in self.planner.extension_runs(cell, rows) if r.run_id not in self.runs]
                if new:
                    self.cell_rounds[cell] += 1
            if not new and cell not in self.noise_planned:
                self.noise_planned.add(cell)
                grid_rows = [r for r in rows if r.get("grid") != "noise"]
                new = [r for r in self.planner.noise_runs(cell, grid_rows) if r.run_id not in self.runs]
            if not new:
                self.cell_closed.add(cell)
                return
            self.add_runs(new, progress)

    # -- units ----------------------------------------------------------------------------------------
    def make_units(self) -> list[dict]:
        """Group the pending runs into units: families (fork_cooldowns), population groups or single runs."""
        pending = [self.runs[rid] for rid in self.pending]
        self.pending = []
        units: list[tuple[str, list]] = []
        if self.spec.fork_cooldowns:
            grouped = families(pending)
            units += [("family", members) for members in grouped if len(members) > 1]
            pending = [members[0] for members in grouped if len(members) == 1]
        groups: dict[str, list] = defaultdict(list)
        for r in pending:
            groups[r.population_key if self.spec.population == "lr" else r.run_id].append(r)
        for members in groups.values():
            members.sort(key=lambda r: r.lr)
            units.append(("population" if len(members) > 1 else "solo", members))
        out = []
        for kind, members in units:
            forks = fork_plan(members) if kind == "family" else {}
            out.append({"id": next(self.unit_ids), "kind": kind, "shape_key": members[0].shape_key,
                        "flops": sum(r.flops * trained_share(r, forks) for r in members),
                        "runs": [_payload(r, self.spec.name) for r in members],
                        "probe_steps": self.opts.population_probe_steps,
                        "force": self.opts.force_population,
                        "decisions": str(self.out_dir / "population_decisions.jsonl")})
        return out

    @staticmethod
    def pick(units: list[dict], slot, busy_shapes: set[str]) -> dict:
        """Same shape as the worker's last unit if any; else the shape with the most work nobody is on."""
        same = [u for u in units if u["shape_key"] == slot.last_shape]
        if same:
            return same[0]
        work: dict[str, float] = defaultdict(float)
        for u in units:
            work[u["shape_key"]] += u["flops"]
        free = [s for s in work if s not in busy_shapes] or list(work)
        shape = max(free, key=work.get)
        return next(u for u in units if u["shape_key"] == shape)

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, executor, progress) -> None:
        self.previous = self.store.latest()
        self.add_runs(self.planner.initial_runs(), progress)
        for cell in list(self.cell_runs):
            self.advance_cell(cell, progress)
        units: list[dict] = []
        in_flight = 0
        stopping = None
        while True:
            if stopping is None and signals.requested():  # forward once; wait for the workers to save
                stopping = signals.requested()
                getattr(executor, "interrupt", lambda _: None)(stopping)
                units, self.pending = [], []  # not started: planned again by the next invocation
            if self.pending:
                units += self.make_units()
            for slot in executor.free_slots():
                if not units:
                    break
                busy = {s.last_shape for s in executor.slots if s.unit is not None}
                unit = self.pick(units, slot, busy)
                units.remove(unit)
                executor.submit(slot, unit)
                in_flight += 1
            if not units and in_flight == 0 and not self.pending:
                break
            for event in executor.poll(0.5):
                kind = event["event"]
                if kind == "started":
                    progress.start(event["run_id"])
                elif kind == "result":
                    self.on_result(event["row"], event.get("appended", False), progress)
                elif kind == "unit_done":
                    in_flight -= 1
                elif kind == "unit_lost":
                    in_flight -= 1
                    self.lost_units += 1
                    if stopping:  # killed by the signal itself: no verdict, the next invocation reruns it
                        continue
                    recorded = self.store.latest()  # a worker may have appended a row just before it died
                    for payload in event["unit"]["runs"]:
                        rid = payload["row"]["run_id"]
                        if rid in self.rows or rid in self.pending:
                            continue
                        if recorded.get(rid, {}).get("status") in ("ok", "diverged"):
                            self.on_result(recorded[rid], True, progress)
                        else:
                            self.on_result(self.failed_row(payload, event["reason"]), False, progress)

    def failed_row(self, payload: dict, reason: str) -> dict:
        return result_row(payload, None, wall_s=0.0, compile_s=None, mode="solo", error=reason)

    def on_result(self, row: dict, appended: bool, progress) -> None:
        rid = row["run_id"]
        if rid in self.rows:
            return
        if row["status"] == "interrupted":  # recorded, but not a result: the next invocation resumes it
            if not appended:
                self.store.append(row)
            self.interrupted.append(row)
            progress.finish(row)
            return
        if row["status"] == "failed":
            self.attempts[rid] += 1
            if self.attempts[rid] <= self.opts.max_retries:
                progress.retry(rid)
                self.pending.append(rid)
                return
            row["attempts"] = self.attempts[rid]
        if not appended:
            self.store.append(row)
        self.rows[rid] = row
        self.new_rows.append(row)
        progress.finish(row)
        self.advance_cell(self.runs[rid].cell, progress)


def _sum(rows, key) -> float:
    return float(sum(r.get(key) or 0.0 for r in rows))


def fork_savings(rows) -> dict:
    """Tokens the finished runs trained, against what they would have trained without forks (a fork trains
    from its fork step; a diverged run up to its divergence)."""
    trained = without = 0.0
    forks = 0
    for row in rows:
        if row.get("status") not in ("ok", "diverged"):
            continue
        end = row.get("diverged_step") or row["steps"]
        start = min(row.get("fork_step") or 0, end)
        forks += bool(start)
        trained += (end - start) * row["batch_tokens"]
        without += end * row["batch_tokens"]
    return {"runs": forks, "tokens_trained": trained, "tokens_without_forks": without,
            "saving": round(1.0 - trained / without, 4) if without else 0.0}


def _noise(results_path: Path) -> dict | None:
    """The seed noise at the cells' optima (`qwenjax.scaling.noise_floor`), as `qwenjax fit` reports it."""
    try:
        return noise_floor(load_results(results_path))
    except UserError:  # no results yet
        return None


def summarize(driver: _Driver, wall_s: float, executor_desc: str) -> dict:
    """The sweep summary: counts, compile vs step time, population decisions, best run per cell."""
    all_rows = list(driver.rows.values())
    new = driver.new_rows
    compile_s = _sum(new, "compile_s")
    run_s = _sum(new, "wall_s")
    best: dict[str, dict] = {}
    for row in all_rows:
        if row.get("status") != "ok":
            continue
        loss = row_loss(row)
        if not math.isfinite(loss):
            continue
        key = f"{row['n_params']}/{row['tokens']:g}"
        if key not in best or loss < best[key]["loss"]:
            best[key] = {"n_params": row["n_params"], "tokens": row["tokens"], "loss": loss, "lr": row["lr"],
                         "batch_size": row["batch_size"], "run_id": row["run_id"]}
    decisions = jsonl.read(driver.out_dir / "population_decisions.jsonl")
    counts = defaultdict(int)
    for row in all_rows:
        counts[row.get("status", "failed")] += 1
    modes = defaultdict(int)
    for row in new:
        modes[row.get("mode", "solo")] += 1
    return {
        "name": driver.spec.name, "out_dir": str(driver.out_dir), "executor": executor_desc,
        "planned_runs": len(driver.runs), "finished": len(driver.rows), "counts": dict(counts),
        "trained_now": len(new), "modes_now": dict(modes),
        "extension_runs": sum(1 for r in driver.runs.values() if r.grid == "extension"),
        "wall_s": round(wall_s, 2),
        "compile_s": round(compile_s, 2), "run_wall_s": round(run_s, 2),
        "step_and_other_s": round(run_s - compile_s, 2),
        "compile_share": round(compile_s / run_s, 4) if run_s > 0 else None,
        "lost_units": driver.lost_units,
        "forks": fork_savings(all_rows),
        "population_decisions": decisions,
        "best_per_cell": sorted(best.values(), key=lambda b: (b["n_params"], b["tokens"])),
        "noise": _noise(driver.store.path),
        "failed_runs": [{"run_id": r["run_id"], "error": r.get("error") or "?"}
                        for r in all_rows if r.get("status") == "failed"],
        "cells_extended": {f"{driver.planner.models[c[0]].n_params}/{c[1]:g}": n
                           for c, n in driver.cell_rounds.items() if n},
    }


def make_executor(spec, out_dir: Path, opts: SweepOptions):
    """The executor `opts.executor` names. A new executor is one more branch here, with the interface the
    driver uses: `slots` (each with `unit` and `last_shape`), `free_slots`, `submit`, `poll`, `close` and
    `describe` (see `local.py`)."""
    if opts.executor == "local":
        return LocalExecutor(out_dir, opts.workers or 1, run_fn=opts.run_fn, resources=spec.resources)
    if opts.executor == "ray":
        return RayExecutor(out_dir, address=opts.ray_address, resources=spec.resources,
                           max_retries=opts.max_retries, workers=opts.workers, run_fn=opts.run_fn,
                           num_cpus=opts.ray_num_cpus)
    raise UserError(f"--executor must be local or ray, got {opts.executor!r}")


def run_sweep(spec, out_dir: str | os.PathLike, opts: SweepOptions | None = None) -> dict:
    """Run (or resume) a sweep; returns the summary that is also written to DIR/summary.json.

    The sweep holds `DIR/.lock` throughout (a second sweep on DIR gets a UserError naming the holder; each run
    directory's own lock is taken by the worker that trains it). On SIGTERM/SIGINT the workers get the signal,
    the runs in progress save a checkpoint and are recorded `interrupted`, the summary is written and
    `signals.Interrupted` raised: rerunning the command continues them."""
    opts = opts or SweepOptions()
    if opts.max_retries < 0:
        raise UserError(f"--max-retries must be >= 0, got {opts.max_retries}")
    if not hasattr(spec, "models"):
        spec = load_spec(spec)
    out_dir = Path(out_dir).resolve()
    with DirLock(out_dir, "sweep folder"), signals.stop_signals():
        return _run_sweep(spec, out_dir, opts)


def _run_sweep(spec, out_dir: Path, opts: SweepOptions) -> dict:
    driver = _Driver(spec, out_dir, opts)  # plans and validates before anything starts
    jsonl.atomic_write_text(out_dir / "spec.json", json.dumps(spec_dict(spec), indent=1, default=str) + "\n")
    t0 = time.perf_counter()
    executor = make_executor(spec, out_dir, opts)
    progress = Progress(spec.name, live=opts.live)
    try:
        with progress:
            driver.run(executor, progress)
    finally:
        executor.close()
    summary = summarize(driver, time.perf_counter() - t0, executor.describe())
    jsonl.atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    signum = signals.requested()
    if signum:
        n = len(driver.interrupted)
        raise signals.Interrupted(signum, f"sweep interrupted ({signals.signal_name(signum)}): {n} run"
                                          f"{'' if n == 1 else 's'} interrupted (each saved a checkpoint in its "
                                          f"run directory); results in {out_dir / 'results.jsonl'}; rerun the "
                                          "same command to continue")
    return summary
