"""Populations of learning rates: runs that differ only in lr train together as one compiled program.

Why: the runs of one (N, D, batch, seed) point of a sweep share everything but their lr, which the trainer
passes as a traced value. Training them together pays for data preparation, the data pipeline, eval
batches, compilation and per-step dispatch once instead of once per run, and keeps more work in one call.

How: the members' train states are stacked along a leading population axis and stepped by one jitted
function built from the trainer's pure `train_step`, on the same batches (`qwenjax.train.population_step`,
trained by `qwenjax.train.train_population`, the trainer's one loop). This module holds only the probe and
the decision. Three ways to apply the step to the stack (`strategy`):
- `vmap`: `jax.vmap` over (state, hp). Turns every matmul into a batched dot_general, which XLA's CPU
  backend runs slowly (measured 0.67x of solo for a 2-layer 64-wide model), but it suits accelerators.
- `map`: `jax.lax.map` over the members inside the one jit: the members' steps run one after another as
  the same 2-D matmuls as a solo run, in one program call (one dispatch, no batched dots).
- `unroll`: the members' steps written out side by side in one program, which XLA may run concurrently
  on the CPU thread pool; compiles P times more code.
Which is fastest depends on the model, the batch and the machine, so the sweep measures it: a short probe
times k steps of the solo step and of each strategy on the unit's real shapes and picks the population only
when it beats sequential solo runs (`decide`); the decision is recorded in
`DIR/population_decisions.jsonl` and reused for every later unit of the same shape and size.

Each member is its own run, trained by the trainer's one loop (`qwenjax.train.train_population`): a
diverged member is frozen while the others go on, and every member's run_dir holds what its solo run would
write (the tests check that a member's loss curve equals its solo run's). Populations do not checkpoint: a
killed population unit starts again (solo checkpoints cover long runs; populations suit the many short ones).
"""

from __future__ import annotations

import functools
import math
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from qwenjax import jsonl
from qwenjax.run_config import config_from_dict, model_config
from qwenjax.sweep.results import recover_finished, result_row

STRATEGIES = ("map", "vmap", "unroll")  # qwenjax.train.step.STRATEGIES, here without importing JAX
#: a population must beat sequential solo steps by this factor to be chosen (the probe is noisy)
MIN_GAIN = 1.05


# ---------------------------------------------------------------------------------------------------------
# Decisions (shared by the workers of a sweep through a JSON-lines file)


def read_decisions(path: str | os.PathLike) -> list[dict]:
    return jsonl.read(path)


def find_decision(path, shape_key: str, members: int) -> dict | None:
    for d in reversed(read_decisions(path)):
        if d.get("shape_key") == shape_key and d.get("members") == members:
            return d
    return None


# ---------------------------------------------------------------------------------------------------------
# The probe


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def measure(run_cfgs: Sequence, *, steps: int = 5, strategies: Sequence[str] = STRATEGIES,
            model_cfg=None, solo_runs: bool = False, rounds: int = 3) -> dict:
    """Time the solo step and each population strategy for these members, interleaved.

    Everything is compiled first; then `rounds` rounds each time `steps` solo steps and `steps` steps of
    every strategy, back to back, so that a change in the machine's load (a shared CPU) hits both sides of
    a round alike; each ratio is the median over rounds of members x solo step time / population step time
    (> 1: the population is faster). With `solo_runs`, a round's solo side is `members` sequential runs of
    `steps` steps, each from a fresh state (what a sweep without populations does in one process).
    Returns {"solo_step_s", "solo_compile_s", "strategies": {name: {"step_s", "compile_s", "ratio"}}}.
    """
    import jax  # JAX loads only where a probe runs (the sweep driver imports this module for its decisions)

    from qwenjax.bench import random_batch
    from qwenjax.train import step as tstep

    cfg = run_cfgs[0]
    mc = model_cfg or model_config(cfg)
    static = tstep.make_step_static(cfg)
    members = len(run_cfgs)
    batch = jax.device_put(random_batch(mc.vocab_size, cfg.train.batch_size, cfg.train.seq_len))
    hps = [tstep.make_hparams(c) for c in run_cfgs]
    stacked_hps = tstep.stack(hps)
    alive = jax.numpy.ones((members,), bool)
    solo = jax.jit(tstep.static_step(static, mc), donate_argnums=(0,))
    init = jax.jit(functools.partial(tstep.init_train_state, mc))
    key = jax.random.key(cfg.seed)

    def timed(fn, state, *args) -> tuple[Any, float]:
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = fn(state, *args)
        jax.block_until_ready(m)
        return state, (time.perf_counter() - t0) / steps

    t0 = time.perf_counter()  # compile (and one step) of everything before any timing
    state, m = solo(init(key), batch, hps[0])
    jax.block_until_ready(m)
    solo_compile = time.perf_counter() - t0
    pops: dict[str, list] = {}
    for strategy in strategies:
        fn = tstep.population_step(mc, static, strategy, members)
        t0 = time.perf_counter()
        states, m = fn(tstep.stack([init(key)] * members), batch, stacked_hps, alive)
        jax.block_until_ready(m)
        pops[strategy] = [fn, states, time.perf_counter() - t0]

    solo_times: list[float] = []
    pop_times: dict[str, list[float]] = {s: [] for s in strategies}
    for _ in range(max(1, rounds)):
        if solo_runs:
            t0 = time.perf_counter()
            for hp in hps:
                timed(solo, init(key), batch, hp)
            solo_times.append((time.perf_counter() - t0) / (members * steps))
        else:
            state, per_step = timed(solo, state, batch, hps[0])
            solo_times.append(per_step)
        for strategy, entry in pops.items():
            entry[1], per_step = timed(entry[0], entry[1], batch, stacked_hps, alive)
            pop_times[strategy].append(per_step)
    out: dict[str, Any] = {"members": members, "steps": steps, "rounds": max(1, rounds),
                           "solo_step_s": _median(solo_times), "solo_compile_s": solo_compile, "strategies": {}}
    for strategy, times in pop_times.items():
        ratios = [members * a / b if b > 0 else math.inf for a, b in zip(solo_times, times, strict=True)]
        out["strategies"][strategy] = {"step_s": _median(times), "compile_s": pops[strategy][2],
                                       "ratio": _median(ratios)}
    return out


def decide(run_cfgs: Sequence, *, steps: int, shape_key: str, model_cfg=None,
           strategies: Sequence[str] | None = None) -> dict:
    """Population (with its best strategy) or solo for these members, from a short measured probe."""
    import jax  # see `measure`

    if strategies is None:
        # batched dots are slow on XLA:CPU and unrolling duplicates code for accelerators: probe the rest
        strategies = ("map", "unroll") if jax.default_backend() == "cpu" else ("vmap", "map")
    m = measure(run_cfgs, steps=steps, strategies=strategies, model_cfg=model_cfg)
    best = max(m["strategies"], key=lambda s: m["strategies"][s]["ratio"])
    ratio = m["strategies"][best]["ratio"]
    mode = "population" if ratio >= MIN_GAIN else "solo"
    return {"shape_key": shape_key, "members": len(run_cfgs), "mode": mode,
            "strategy": best if mode == "population" else None, "ratio": round(ratio, 3),
            "probe": {**{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()
                         if k != "strategies"},
                      "strategies": {s: {k: round(v, 5) for k, v in d.items()}
                                     for s, d in m["strategies"].items()}},
            "backend": jax.default_backend()}


# ---------------------------------------------------------------------------------------------------------
# In a sweep worker


def execute_population(unit: dict, run_fn, emit: Callable[[dict], None],
                       finished: Callable[[dict], None]) -> None:
    """Train a population unit in this worker: decide (probe, or reuse the recorded decision), then train
    the members together, or one after another as solo runs when that is faster."""
    from qwenjax.sweep.runner import CompileClock, execute_run  # the runner sets JAX up: a worker's import
    from qwenjax.train import train_population  # JAX (see `measure`)

    payloads = []
    for payload in unit["runs"]:  # members finished but unrecorded (a kill) need no training
        row = recover_finished(payload)
        if row is not None:
            finished(row)
        else:
            payloads.append(payload)
    if not payloads:
        return
    cfgs = [config_from_dict(p["config"]) for p in payloads]
    decision = None
    if len(payloads) > 1:
        decision = _decision(unit, cfgs, len(payloads))
    if decision is None or decision["mode"] != "population":
        for payload in payloads:
            emit({"event": "started", "run_id": payload["row"]["run_id"]})
            finished(execute_run(payload, run_fn))
        return
    for payload in payloads:
        emit({"event": "started", "run_id": payload["row"]["run_id"]})
    t0, c0 = time.perf_counter(), CompileClock.read()
    try:
        summaries = train_population(cfgs, decision["strategy"])
    except Exception:  # noqa: BLE001 - fall back to solo runs: one member's problem must not sink all
        traceback.print_exc()
        for payload in payloads:
            finished(execute_run(payload, run_fn))
        return
    wall = time.perf_counter() - t0
    compile_s = (CompileClock.read() - c0) / len(payloads)
    for payload, summary in zip(payloads, summaries, strict=True):
        row = result_row(payload, summary, wall_s=wall / len(payloads), compile_s=compile_s,
                         mode="population")
        row["population_size"] = len(payloads)
        row["population_strategy"] = decision["strategy"]
        finished(row)


def _decision(unit: dict, cfgs: list, members: int) -> dict | None:
    from qwenjax.data.prepare import prepare_data  # JAX (see `measure`)
    from qwenjax.train import sharding  # JAX (see `measure`)

    path = unit.get("decisions")
    force = unit.get("force")
    if force in ("population", "solo"):
        return {"mode": force, "strategy": unit.get("strategy") or "map"}
    if sharding.mesh_from_config(cfgs[0].mesh).devices.size != 1:
        return None
    if path:
        found = find_decision(path, unit["shape_key"], members)
        if found is not None:
            return found
    vocab = prepare_data(cfgs[0]).vocab_size  # the trained tokenizer's size: the model's real shape
    d = decide(cfgs, steps=unit.get("probe_steps", 5), shape_key=unit["shape_key"],
               model_cfg=model_config(cfgs[0], vocab_size=vocab))
    d["decided_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if path:
        jsonl.append(path, d)
    return d
