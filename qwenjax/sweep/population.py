"""Populations of learning rates: runs that differ only in lr train together as one compiled program.

Why: the runs of one (N, D, batch, seed) point of a sweep share everything but their lr, which the trainer
passes as a traced value. Training them together pays for data preparation, the data pipeline, eval
batches, compilation and per-step dispatch once instead of once per run, and keeps more work in one call.

How: the members' train states are stacked along a leading population axis and stepped by one jitted
function built from the trainer's pure `train_step`, on the same batches. Three ways to apply the step to
the stack (`strategy`):
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

Each member is its own run: a diverged member (non-finite loss, or above divergence_factor x its first
loss, checked at the same steps as the trainer checks) is frozen (its state is no longer updated) and
reported diverged at that step, while the others go on; every member gets its own run_dir with
config.yaml, metrics.jsonl and summary.json exactly as a solo run writes them (the tests check that a
member's loss curve equals its solo run's). Populations do not checkpoint: a killed population unit starts
again (the solo trainer's checkpoints cover long runs; populations are meant for the many short ones).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STRATEGIES = ("map", "vmap", "unroll")
#: a population must beat sequential solo steps by this factor to be chosen (the probe is noisy)
MIN_GAIN = 1.05


# ---------------------------------------------------------------------------------------------------------
# Decisions (shared by the workers of a sweep through a JSON-lines file)


def read_decisions(path: str | os.PathLike) -> list[dict]:
    from qwenjax.train.metrics import read_metrics  # the one reader of append-only JSON-lines files

    return read_metrics(path)


def find_decision(path, shape_key: str, members: int) -> dict | None:
    for d in reversed(read_decisions(path)):
        if d.get("shape_key") == shape_key and d.get("members") == members:
            return d
    return None


# ---------------------------------------------------------------------------------------------------------
# The population step


def _stack(trees: Sequence[Any]):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def population_step(model_cfg, optim_static, strategy: str, members: int) -> Callable:
    """jit((states, batch, hps, alive) -> (states, metrics)) over a stack of `members` train states.

    A member with alive == False keeps its state (a diverged member is frozen)."""
    import jax
    import jax.numpy as jnp

    from qwenjax.train import train_step

    step = functools.partial(train_step, model_cfg=model_cfg, optim_static=optim_static)

    def frozen(state):
        zero = jnp.zeros((), jnp.float32)
        return state, {"loss": zero, "grad_norm": zero, "lr": zero}

    def one(state, batch, hp, alive):
        return jax.lax.cond(alive, lambda s: step(s, batch, hp), frozen, state)

    if strategy == "vmap":
        def f(states, batch, hps, alive):
            new, metrics = jax.vmap(step, in_axes=(0, None, 0))(states, batch, hps)
            keep = lambda n, o: jnp.where(alive.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
            return jax.tree.map(keep, new, states), metrics
    elif strategy == "map":
        def f(states, batch, hps, alive):
            return jax.lax.map(lambda x: one(x[0], batch, x[1], x[2]), (states, hps, alive))
    elif strategy == "unroll":
        def f(states, batch, hps, alive):
            pick = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
            return _stack([one(pick(states, i), batch, pick(hps, i), alive[i]) for i in range(members)])
    else:
        raise ValueError(f"unknown population strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    return jax.jit(f, donate_argnums=(0,))


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Random tokens in the trainer's batch format (for probes and benchmarks: shapes are what matter)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"inputs": jnp.asarray(rng.integers(0, vocab_size, (batch_size, seq_len)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, vocab_size, (batch_size, seq_len)), jnp.int32),
            "segment_ids": jnp.ones((batch_size, seq_len), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len)),
            "loss_mask": jnp.ones((batch_size, seq_len), jnp.float32)}


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
    import jax

    from qwenjax.run_config import model_config
    from qwenjax.train import init_train_state, make_hparams, make_optim_static, train_step

    cfg = run_cfgs[0]
    mc = model_cfg or model_config(cfg)
    static = make_optim_static(cfg)
    members = len(run_cfgs)
    batch = synthetic_batch(cfg.train.batch_size, cfg.train.seq_len, mc.vocab_size)
    hps = [make_hparams(c) for c in run_cfgs]
    stacked_hps = _stack(hps)
    alive = jax.numpy.ones((members,), bool)
    solo = jax.jit(functools.partial(train_step, model_cfg=mc, optim_static=static), donate_argnums=(0,))
    init = jax.jit(functools.partial(init_train_state, mc))
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
        fn = population_step(mc, static, strategy, members)
        t0 = time.perf_counter()
        states, m = fn(_stack([init(key)] * members), batch, stacked_hps, alive)
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
    import jax

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
# Training a population


def _member_logger(cfg, total_steps: int):
    from qwenjax.run_config import save_config
    from qwenjax.train import metrics as qmetrics

    run_dir = Path(cfg.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "summary.json").unlink(missing_ok=True)
    qmetrics.truncate_metrics(run_dir / "metrics.jsonl", 0)
    return qmetrics.MetricsLogger(run_dir, total_steps=total_steps, tensorboard=False, progress=False)


def train_population(run_cfgs: Sequence, strategy: str = "map") -> list[dict]:
    """Train runs that differ only in optim.lr together; returns one summary per member (as `train`).

    The loop mirrors `qwenjax.train.train` step for step (log cadence, divergence rule, eval, final-loss
    definition) so that every member's metrics.jsonl and summary.json are those of its solo run.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwenjax import model as qmodel
    from qwenjax.config import flops_per_token
    from qwenjax.data import make_eval_batches, make_train_iterator
    from qwenjax.run_config import atomic_write_text, model_config, planned_tokens
    from qwenjax.train import (
        compiled_eval_step,
        heldout_loss,
        init_state_sharded,
        make_hparams,
        make_optim_static,
        prepare_data,
        sharding,
        step_events,
    )
    from qwenjax.train import metrics as qmetrics
    from qwenjax.train.loop import _mean_last

    t_start = time.perf_counter()
    cfgs = list(run_cfgs)
    base = cfgs[0]
    P = len(cfgs)
    mesh = sharding.mesh_from_config(base.mesh)
    if mesh.devices.size != 1:
        raise ValueError("populations train on one device; this mesh has several")
    B, T, k = base.train.batch_size, base.train.seq_len, base.train.grad_accum
    data = prepare_data(base)
    mc = model_config(base, vocab_size=data.vocab_size)
    train_iter = make_train_iterator(data.caches, data.weights, seq_len=T, global_batch_size=B,
                                     seed=base.seed)
    eval_bs = B // k
    eval_sets = [[sharding.global_batch(b, mesh, eval_bs) for b in make_eval_batches(
        c, seq_len=T, batch_size=eval_bs, num_batches=base.eval.num_batches(eval_bs))] for c in data.caches]
    n_total, n_non_embedding = qmodel.count_params(mc)
    fpt = flops_per_token(mc, T)
    peak, peak_source = qmetrics.peak_flops(mesh.devices.flat)
    static = make_optim_static(base)
    hps = _stack([make_hparams(c) for c in cfgs])
    state0 = init_state_sharded(mc, jax.random.key(base.seed), mesh)
    states = _stack([state0] * P)
    del state0
    alive = np.ones(P, bool)

    step_fn = population_step(mc, static, strategy, P)
    eval_fn, compile_eval_s = compiled_eval_step(mc, mesh, eval_bs, T)
    param_sh = sharding.state_shardings(qmodel.abstract_params(mc), mesh, mc)  # one member's params
    loggers = [_member_logger(c, base.train.steps) for c in cfgs]
    records: list[list[dict]] = [[] for _ in range(P)]
    initial = [None] * P
    diverged_step: list[int | None] = [None] * P
    eval_loss: list[float | None] = [None] * P
    compile_s = None  # measured on the first step call

    def evaluate(i: int) -> float:
        params = jax.device_put(jax.tree.map(lambda x: x[i], states["params"]), param_sh)
        return heldout_loss(eval_fn, params, eval_sets, data.weights)[0]

    step = 0
    alive_dev = None  # alive on the device, re-sent only when a member diverges
    pending: list[tuple[int, Any]] = []
    mark_time, mark_step = time.perf_counter(), 0
    train_s = 0.0
    try:
        while step < base.train.steps and alive.any():
            batch = sharding.global_batch(next(train_iter), mesh, B)
            call_t = time.perf_counter()
            if alive_dev is None:
                alive_dev = jnp.asarray(alive)
            states, m = step_fn(states, batch, hps, alive_dev)
            if compile_s is None:  # first call: compile + one step
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - call_t + compile_eval_s
            step += 1
            pending.append((step, m))
            do_eval, _, fetch = step_events(base, step)
            if not fetch:
                continue
            fetched = jax.device_get([x for _, x in pending])
            now = time.perf_counter()
            train_s += now - mark_time
            tokens_per_s = (step - mark_step) * B * T / max(now - mark_time, 1e-9)
            for i in np.flatnonzero(alive):
                record_step, values = pending[-1][0], {k: v[i] for k, v in fetched[-1].items()}
                for s, mm in zip((s for s, _ in pending), fetched, strict=True):
                    loss = float(mm["loss"][i])
                    if initial[i] is None:
                        initial[i] = loss
                    if not math.isfinite(loss) or loss > cfgs[i].train.divergence_factor * initial[i]:
                        diverged_step[i], record_step = s, s
                        values = {k: v[i] for k, v in mm.items()}
                        break
                record = {"step": record_step, "loss": float(values["loss"]), "lr": float(values["lr"]),
                          "grad_norm": float(values["grad_norm"]), "tokens": record_step * B * T,
                          "tokens_per_s": tokens_per_s / P, "mfu": tokens_per_s * fpt / peak}
                if diverged_step[i] is not None:
                    alive[i], alive_dev = False, None
                    limit = cfgs[i].train.divergence_factor
                    loggers[i].message(f"diverged at step {diverged_step[i]}: loss {record['loss']:.4g} "
                                       f"(initial {initial[i]:.4g}, limit x{limit})")
                elif do_eval:
                    eval_loss[i] = evaluate(i)
                    record["eval_loss"] = eval_loss[i]
                records[i].append(record)
                loggers[i].log(record)
            pending.clear()
            mark_time, mark_step = time.perf_counter(), step
    finally:
        for lg in loggers:
            lg.close()
        close = getattr(train_iter, "close", None)
        if close:
            close()

    wall = time.perf_counter() - t_start
    summaries = []
    for i, cfg in enumerate(cfgs):
        diverged = diverged_step[i] is not None
        steps_done = diverged_step[i] if diverged else step
        tokens = steps_done * B * T
        summary = {
            "run_dir": str(cfg.run_dir), "complete": True, "status": "diverged" if diverged else "ok",
            "n_params": n_non_embedding, "n_params_total": n_total,
            "tokens": tokens, "planned_tokens": planned_tokens(cfg),
            "steps": cfg.train.steps, "steps_completed": steps_done, "batch_size": B, "seq_len": T,
            "batch_tokens": B * T, "lr": cfg.optim.lr,
            "final_loss": _mean_last([r.get("loss") for r in records[i]]),
            "eval_loss": None if diverged else eval_loss[i],
            "initial_loss": initial[i], "diverged": diverged, "diverged_step": diverged_step[i],
            # the population's time, split evenly: what each member cost
            "wall_s": wall / P, "compile_s": (compile_s or 0.0) / P,
            "flops": fpt * tokens, "flops_per_token": fpt,
            "tokens_per_s": step * B * T / train_s if train_s > 0 else None,
            "peak_flops": peak, "peak_flops_source": peak_source,
            "vocab_size": mc.vocab_size, "tokenizer": str(data.tokenizer_path),
            "schedule": cfg.optim.schedule, "warmup_steps": cfg.optim.warmup_steps,
            "weight_decay": cfg.optim.weight_decay, "seed": cfg.seed,
            "mesh": dict(mesh.shape), "devices": 1, "processes": 1, "platform": jax.devices()[0].platform,
            "hparams": cfg.hparams, "mode": "population",
            "population": {"size": P, "strategy": strategy, "wall_s": wall, "compile_s": compile_s,
                           "lrs": [c.optim.lr for c in cfgs]},
        }
        summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                   for k, v in summary.items()}
        atomic_write_text(Path(cfg.run_dir) / "summary.json", json.dumps(summary, indent=1) + "\n")
        summaries.append(summary)
    return summaries


# ---------------------------------------------------------------------------------------------------------
# In a sweep worker


def _append_decision(path: str, decision: dict) -> None:
    from qwenjax.sweep.results import append_line

    append_line(path, decision)


def execute_population(unit: dict, run_fn, emit: Callable[[dict], None],
                       finished: Callable[[dict], None]) -> None:
    """Train a population unit in this worker: decide (probe, or reuse the recorded decision), then train
    the members together, or one after another as solo runs when that is faster."""
    from qwenjax.run_config import config_from_dict
    from qwenjax.sweep.results import recover_finished, result_row
    from qwenjax.sweep.runner import CompileClock, execute_run

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
        import traceback

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
    from qwenjax.run_config import model_config
    from qwenjax.train import sharding

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
    from qwenjax.train import prepare_data

    vocab = prepare_data(cfgs[0]).vocab_size  # the trained tokenizer's size: the model's real shape
    d = decide(cfgs, steps=unit.get("probe_steps", 5), shape_key=unit["shape_key"],
               model_cfg=model_config(cfgs[0], vocab_size=vocab))
    d["decided_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if path:
        _append_decision(path, d)
    return d


# ---------------------------------------------------------------------------------------------------------
# Benchmark


def _end_to_end(cfgs: list, *, strategy: str, steps: int, workdir: str | os.PathLike | None) -> dict:
    """Whole runs on real data: `train` for each member one after another vs one `train_population`.

    What a sweep pays per run beyond the step (data pipeline, eval, checkpoints, logging) is included;
    compile time is excluded from both sides (each side's first compile is reported separately)."""
    import tempfile

    from qwenjax.sweep.plan import replace_dotted
    from qwenjax.train import train

    root = Path(workdir or tempfile.mkdtemp(prefix="qwenjax-bench-"))
    fix = {"train.steps": steps, "optim.warmup_steps": max(1, steps // 10)}
    solo_cfgs = [replace_dotted(c, {**fix, "run_dir": str(root / "solo" / str(i))})
                 for i, c in enumerate(cfgs)]
    pop_cfgs = [replace_dotted(c, {**fix, "run_dir": str(root / "pop" / str(i))}) for i, c in enumerate(cfgs)]
    t0 = time.perf_counter()
    solo = [train(c) for c in solo_cfgs]
    solo_s = time.perf_counter() - t0
    solo_compile = sum(float(s.get("compile_s") or 0.0) for s in solo)
    t0 = time.perf_counter()
    pop = train_population(pop_cfgs, strategy)
    pop_s = time.perf_counter() - t0
    pop_compile = float(pop[0]["population"]["compile_s"] or 0.0)
    return {"steps": steps, "strategy": strategy, "solo_s": solo_s, "solo_compile_s": solo_compile,
            "population_s": pop_s, "population_compile_s": pop_compile,
            "ratio": (solo_s - solo_compile) / max(pop_s - pop_compile, 1e-9)}


def benchmark_population(run_cfg, *, members: int = 8, steps: int = 10,
                         strategies: Sequence[str] = STRATEGIES, lr_spread: float = 2.0,
                         end_to_end: bool = False, end_to_end_steps: int = 50,
                         workdir: str | os.PathLike | None = None, rounds: int = 3) -> dict:
    """Population throughput vs `members` sequential solo runs in this process, per strategy.

    Members get learning rates run_cfg.optim.lr x lr_spread^(j - members/2) (values do not change the cost).
    Solo: `members` runs of `steps` steps, one after another, each from a fresh state, sharing one compiled
    step (the best case for solo). Population: `members` members for `steps` steps. Both on synthetic
    batches of the config's shapes, interleaved over `rounds` rounds (median ratio); compile times are
    reported separately and excluded from the ratio.
    With `end_to_end`, also whole runs on real data with the best strategy (`_end_to_end`).
    """
    import jax

    from qwenjax.model import count_params
    from qwenjax.run_config import model_config
    from qwenjax.sweep.plan import replace_dotted

    cfgs = [replace_dotted(run_cfg, {"optim.lr": run_cfg.optim.lr * lr_spread ** (j - members // 2)})
            for j in range(members)]
    mc = model_config(run_cfg)
    m = measure(cfgs, steps=steps, strategies=strategies, model_cfg=mc, solo_runs=True, rounds=rounds)
    total, non_embedding = count_params(mc)
    if end_to_end:
        best = max(m["strategies"], key=lambda s: m["strategies"][s]["ratio"])
        m["end_to_end"] = _end_to_end(cfgs, strategy=best, steps=end_to_end_steps, workdir=workdir)
    m.update(n_params=non_embedding, n_params_total=total, batch_size=run_cfg.train.batch_size,
             seq_len=run_cfg.train.seq_len, hidden_size=mc.hidden_size,
             num_hidden_layers=mc.num_hidden_layers,
             vocab_size=mc.vocab_size, backend=jax.default_backend(),
             best=max(m["strategies"], key=lambda s: m["strategies"][s]["ratio"]))
    return m
