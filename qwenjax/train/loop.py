"""The training loop, written once, over a stepper: one run, or a population of learning rates.

`train(run_cfg) -> summary` is a whole run: data (tokenised once into the shared on-disk cache), mesh and
shardings, state created directly sharded or restored from the newest checkpoint in the run directory (or
taken from a previous stage, `model.init_from`), the jitted step with donated state, logging, eval,
checkpoints, divergence detection, the final model directory and `summary.json`. It runs unchanged on one
CPU, a multi-GPU host or a TPU pod (every process runs it; each feeds its own rows of the global batch).

`train_population(run_cfgs, strategy)` trains runs that differ only in optim.lr as one stacked program on
one device (`qwenjax.train.step.population_step`); `qwenjax.sweep.population` decides when that pays.

Both go through `run_steps`, so a member logs exactly the records, divergence and eval of its solo run. A
stepper has `members` (1 for a solo run), `step(batch) -> metrics` (leaves with a leading member axis
for a population), `split(fetched) -> [metrics per member]`, `params(i)` and `freeze(i)` (a diverged
member keeps its state while the others go on). The solo stepper steps the unstacked compiled step, so a
solo run pays nothing for the population axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import model as qmodel
from qwenjax.config import param_counts
from qwenjax.errors import UserError
from qwenjax.lock import DirLock
from qwenjax.model_io import config_to_dict as model_config_to_dict
from qwenjax.run_config import RunConfig, missing_keys, save_config
from qwenjax.train import metrics as qmetrics
from qwenjax.train import sharding
from qwenjax.train.checkpoint import Checkpointer, abstract_with_shardings
from qwenjax.train.dpo_reference import attach_cached_reference
from qwenjax.train.interrupt import interrupted, run_dir_lock, steps, stop_check
from qwenjax.train.objectives import objective_of
from qwenjax.train.run_dir import (
    finished_summary,
    fork_steps,
    model_dir_of,
    step_events,
    summary_fields,
    write_fork,
    write_model,
    write_summary,
)
from qwenjax.train.setup import RunSetup, resolve_dtype, setup_run
from qwenjax.train.stages import train_stages
from qwenjax.train.start import initial_state
from qwenjax.train.step import (
    abstract_state,
    checkpointed,
    compiled_train_step,
    init_state_sharded,
    make_hparams,
    make_step_static,
    population_step,
    stack,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Steppers


class SoloStepper:
    """One run: the compiled, sharded step with donated state."""

    members = 1

    def __init__(self, step_fn, state, hp):
        self.step_fn, self.state, self.hp = step_fn, state, hp

    def step(self, batch):
        self.state, metrics = self.step_fn(self.state, batch, self.hp)
        return metrics

    def split(self, fetched: dict) -> list[dict]:
        return [fetched]

    def params(self, i: int):
        return self.state["params"]

    def freeze(self, i: int) -> None:
        """Nothing to do: a diverged solo run stops."""


class PopulationStepper:
    """Members stacked along a leading axis on one device, stepped by one program; the first call's time
    (compile + one step) is `compile_s`."""

    def __init__(self, setup: RunSetup, cfgs: Sequence[RunConfig], strategy: str):
        static = make_step_static(cfgs[0])
        self.members = len(cfgs)
        self.step_fn = population_step(setup.model_cfg, static, strategy, self.members)
        self.hps = stack([make_hparams(c) for c in cfgs])
        state0 = init_state_sharded(setup.model_cfg, jax.random.key(cfgs[0].seed), setup.mesh)
        self.states = stack([state0] * self.members)
        self.alive = np.ones(self.members, bool)
        self.alive_dev = None  # alive on the device, re-sent only when a member diverges
        self.compile_s = None
        mc = setup.model_cfg
        self.param_sh = sharding.state_shardings(qmodel.abstract_params(mc), setup.mesh, mc)

    def step(self, batch):
        call_t = time.perf_counter()
        if self.alive_dev is None:
            self.alive_dev = jnp.asarray(self.alive)
        self.states, metrics = self.step_fn(self.states, batch, self.hps, self.alive_dev)
        if self.compile_s is None:  # first call: compile + one step
            jax.block_until_ready(metrics)
            self.compile_s = time.perf_counter() - call_t
        return metrics

    def split(self, fetched: dict) -> list[dict]:
        return [{k: v[i] for k, v in fetched.items()} for i in range(self.members)]

    def params(self, i: int):
        return jax.device_put(jax.tree.map(lambda x: x[i], self.states["params"]), self.param_sh)

    def freeze(self, i: int) -> None:
        self.alive[i], self.alive_dev = False, None


# ---------------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class Member:
    """One run's bookkeeping in the loop."""

    cfg: RunConfig
    logger: qmetrics.MetricsLogger
    records: list[dict]
    initial_loss: float | None = None
    diverged_step: int | None = None
    eval_loss: float | None = None


@dataclasses.dataclass
class Progress:
    step: int
    train_s: float = 0.0  # time in steps (excluding eval, checkpoint saves and fork hand-overs)


def run_steps(setup: RunSetup, stepper, members: list[Member], progress: Progress, *,
              forks_at: dict[int, list] | None = None, handover: Callable | None = None,
              after_log: Callable | None = None, should_stop: Callable | None = None) -> int | None:
    """Step until train.steps or until every member diverged; log, evaluate and judge divergence on the
    one cadence (`step_events`). `handover(forks)` hands the state to forks (returns seconds taken);
    `after_log(do_ckpt, forks)` runs after a logged step of a member that has not diverged.
    `should_stop(step)` (read after every step) returns a signal number to stop there, before train.steps:
    then the steps not logged yet are judged but not logged (a resumed run logs what an uninterrupted one
    does), and that signal number is returned; None when the run ended."""
    cfg, P = setup.cfg, stepper.members
    B, T = cfg.train.batch_size, cfg.train.seq_len
    forks_at = forks_at or {}
    pending: list[tuple[int, Any]] = []
    mark_time, mark_step = time.perf_counter(), progress.step
    while progress.step < cfg.train.steps and any(m.diverged_step is None for m in members):
        batch = sharding.global_batch(next(setup.train_iter), setup.mesh, B)
        metrics = stepper.step(batch)
        progress.step += 1
        step = progress.step
        pending.append((step, metrics))
        do_eval, do_ckpt, fetch = step_events(cfg, step)
        forks_here = forks_at.get(step, ())
        signum = should_stop(step) if should_stop is not None and step < cfg.train.steps else None
        if not (fetch or forks_here or signum):
            continue
        fetched = [stepper.split(m) for m in jax.device_get([m for _, m in pending])]
        now = time.perf_counter()
        judged = {i: _judge(m, [(s, f[i]) for (s, _), f in zip(pending, fetched, strict=True)])
                  for i, m in enumerate(members) if m.diverged_step is None}
        if not fetch and all(m.diverged_step is None for m in members):
            if forks_here:
                mark_time += handover(forks_here)  # between logged steps: hand over, log nothing
            if signum:
                progress.train_s += time.perf_counter() - mark_time
                return signum
            continue
        progress.train_s += now - mark_time
        tokens_per_s = (step - mark_step) * B * T / max(now - mark_time, 1e-9)
        pending.clear()
        for i, (record_step, values) in judged.items():
            m = members[i]
            record = {"step": record_step, "loss": float(values["loss"]), "lr": float(values["lr"]),
                      "grad_norm": float(values["grad_norm"]), "tokens": record_step * B * T,
                      "tokens_per_s": tokens_per_s / P, "mfu": tokens_per_s * setup.fpt / setup.peak}
            record.update({k: float(v) for k, v in values.items() if k not in record})  # an objective's own
            if m.diverged_step is not None:
                stepper.freeze(i)
                m.logger.message(f"diverged at step {m.diverged_step}: loss {record['loss']:.4g} (initial "
                                 f"{m.initial_loss:.4g}, limit x{m.cfg.train.divergence_factor})")
            elif do_eval:
                m.eval_loss, per_source = setup.evaluate(stepper.params(i))
                record.update(eval_loss=m.eval_loss, **per_source)
            m.records.append(record)
            m.logger.log(record)
            if m.diverged_step is None and after_log is not None:
                after_log(do_ckpt, forks_here)
        mark_time, mark_step = time.perf_counter(), step
        if signum and any(m.diverged_step is None for m in members):
            return signum
    for i, m in enumerate(members):
        if m.diverged_step is None and m.eval_loss is None:  # resumed at the very end: evaluate once more
            m.eval_loss, _ = setup.evaluate(stepper.params(i))
    return None


def _judge(m: Member, steps: list[tuple[int, dict]]) -> tuple[int, dict]:
    """(step, metrics) to record for member `m` over the steps fetched now: the last one, or the first
    whose loss is non-finite or above divergence_factor x the run's first loss (then `m` has diverged)."""
    for s, values in steps:
        loss = float(values["loss"])
        if m.initial_loss is None:
            m.initial_loss = loss
        if not math.isfinite(loss) or loss > m.cfg.train.divergence_factor * m.initial_loss:
            m.diverged_step = s
            return s, values
    return steps[-1]


def _close(setup: RunSetup | None, loggers) -> None:
    for lg in loggers:
        lg.close()
    close = getattr(setup.train_iter, "close", None) if setup is not None else None
    if close:
        close()


# ---------------------------------------------------------------------------------------------------------
# One run


def train(cfg: RunConfig, forks: Sequence[RunConfig] = ()) -> dict[str, Any]:
    """Run (or resume, or return the summary of an already finished identical run) and return the summary.

    Divergence (a non-finite loss, or a loss above train.divergence_factor x the first step's) stops the run
    early with `diverged: true` in the summary; it is a result, not an error.

    `forks`: configs of shorter WSD runs that differ from this one only in train.steps and run_dir. When this
    run reaches a fork's decay start (`fork_steps`), it writes its complete state there (checkpoint, metrics
    so far, config), so `train(fork)` resumes from it and trains only the fork's cooldown, bit-identical to
    training the fork from scratch. A fork that already has a checkpoint or a summary is left alone.

    The run holds `run_dir/.lock` throughout (a second writer gets a UserError naming the holder). SIGTERM
    or SIGINT stops it after the current step with a complete checkpoint there: `signals.Interrupted`.
    """
    t_start = time.perf_counter()
    sharding.maybe_initialize_distributed()
    cfg, forks = resolve_dtype(cfg), [resolve_dtype(f) for f in forks]  # model.dtype auto -> this platform's
    unset = missing_keys(cfg)
    if unset:
        raise UserError(f"{unset[0]} is not set (the config has ???); pass {unset[0]}=VALUE")
    if cfg.stages:  # a staged run: each stage a run of its own in run_dir/stages/<i> (train/stages.py)
        return train_stages(cfg, train, forks)
    forks_at = fork_steps(cfg, forks)
    run_dir = Path(cfg.run_dir).expanduser()
    is_main = jax.process_index() == 0
    with run_dir_lock(run_dir, is_main), stop_check() as should_stop:
        done = finished_summary(run_dir, cfg)
        if done is not None:
            log.info("%s already finished (summary.json); nothing to do", run_dir)
            return done
        return _train(cfg, run_dir, forks_at, should_stop, t_start)


def _train(cfg: RunConfig, run_dir: Path, forks_at: dict, should_stop: Callable, t_start: float) -> dict:
    is_main = jax.process_index() == 0

    setup = setup_run(cfg)  # all validation before anything is written to the run directory
    mesh, model_cfg = setup.mesh, setup.model_cfg
    B, T = cfg.train.batch_size, cfg.train.seq_len
    objective = objective_of(cfg)
    static = make_step_static(cfg, objective)
    rep = sharding.replicated(mesh)
    hp = jax.device_put(make_hparams(cfg, objective), rep)
    abstract = abstract_state(model_cfg)
    state_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    # The key as a replicated global array (Orbax saves only global arrays in multi-process runs).
    rng_host = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))
    rng_data = jax.make_array_from_callback(rng_host.shape, rep, lambda index: rng_host[index])

    # Resume, or start fresh (or from model.init_from).
    ckpt = Checkpointer(run_dir / "ckpt", keep=cfg.checkpoint.keep) if cfg.checkpoint.enabled else None
    target = {"train": abstract_with_shardings(abstract, state_sh),
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
    restored = ckpt.restore(target) if ckpt is not None and ckpt.all_steps() else None
    meta: dict[str, Any] = {}
    if restored is not None:
        start_step, saved, meta = restored
        state = saved["train"]
        setup.train_iter.set_state(meta["data"])
        log.info("resuming %s from step %d", run_dir, start_step)
    else:
        start_step = 0
        state = initial_state(cfg, model_cfg, jax.random.key(cfg.seed), mesh, state_sh)
    if objective.needs_reference:  # frozen: the stage's starting params (model.init_from), never checkpointed
        ref = (jax.tree.map(jnp.copy, state["params"]) if restored is None else
               initial_state(cfg, model_cfg, jax.random.key(cfg.seed), mesh, state_sh)["params"])
        state = {**state, "ref_params": ref}
    if getattr(objective, "reference", None) == "cached":  # DPO: the reference's log-probs, computed once
        attach_cached_reference(cfg, model_cfg, setup.data.pairs, lambda: state["params"] if restored is None else
                                initial_state(cfg, model_cfg, jax.random.key(cfg.seed), mesh, state_sh)["params"])
    origin = {k: meta[k] for k in ("fork_of", "fork_step", "init_from") if k in meta}
    if restored is None and cfg.model.init_from:
        origin["init_from"] = str(Path(cfg.model.init_from).expanduser().resolve())
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        records = qmetrics.truncate_metrics(run_dir / "metrics.jsonl", start_step)
    else:
        records = []

    step_fn, compile_train_s = compiled_train_step(model_cfg, static, mesh, B, T)
    compile_now = compile_train_s + setup.compile_eval_s
    compile_s = float(meta.get("compile_s", 0.0)) + compile_now
    logger = qmetrics.MetricsLogger(run_dir, total_steps=cfg.train.steps, start_step=start_step,
                                    enabled=is_main, wandb=cfg.train.wandb)
    n_total, n_non_embedding = param_counts(model_cfg)
    logger.message(
        f"{run_dir}: N = {n_non_embedding:,} non-embedding params ({n_total:,} total), "
        f"D = {cfg.train.steps * B * T:,} tokens ({cfg.train.steps} steps x {B} x {T}), "
        f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices "
        f"({jax.process_count()} processes), compile {compile_now:.1f} s, "
        f"peak {setup.peak / 1e9:,.1f} GFLOP/s ({setup.peak_source})")

    stepper = SoloStepper(step_fn, state, hp)
    member = Member(cfg, logger, records, initial_loss=meta.get("initial_loss"))
    progress = Progress(start_step)
    prior_wall = float(meta.get("wall_s", 0.0))
    prior_train_s = float(meta.get("train_s", 0.0))
    saved_step = start_step if restored is not None else None  # the step of the newest checkpoint

    def checkpoint_meta() -> dict[str, Any]:
        return {"data": setup.train_iter.get_state(), "initial_loss": member.initial_loss,
                "wall_s": prior_wall + time.perf_counter() - t_start,
                "train_s": prior_train_s + progress.train_s, "compile_s": compile_s, "step": progress.step,
                "model_config": model_config_to_dict(model_cfg), **origin}

    def saved_state() -> dict[str, Any]:
        return {"train": checkpointed(stepper.state), "rng": rng_data}

    def handover(fork_cfgs) -> float:
        """Hand this run's state after `step` steps to the forks that start here; returns the seconds taken."""
        t0 = time.perf_counter()
        fork_meta = {**checkpoint_meta(), "fork_of": str(run_dir), "fork_step": progress.step}
        for fork in fork_cfgs:
            write_fork(fork, progress.step, saved_state(), fork_meta, records, is_main)
        return time.perf_counter() - t0

    def save() -> None:
        nonlocal saved_step
        ckpt.save(progress.step, saved_state(), checkpoint_meta())
        saved_step = progress.step

    def after_log(do_ckpt: bool, forks_here) -> None:
        if forks_here:  # before this run's own checkpoint: a resume never skips a fork
            handover(forks_here)
        if do_ckpt:
            save()

    try:
        with steps():
            signum = run_steps(setup, stepper, [member], progress, forks_at=forks_at, handover=handover,
                               after_log=after_log, should_stop=should_stop)
        if signum is not None:  # stopped before train.steps: save the state of this very step, completely
            already = saved_step == progress.step
            if ckpt is not None and progress.step > 0 and not already:
                save()
            if ckpt is not None:
                ckpt.wait()
            saved_in = run_dir / "ckpt" / str(progress.step) if saved_step == progress.step else None
            raise interrupted(signum, progress.step, saved_in, already)
    finally:
        if ckpt is not None:
            ckpt.close()
        _close(setup, [logger])

    diverged = member.diverged_step is not None
    if cfg.checkpoint.enabled and not diverged:
        write_model(model_dir_of(run_dir), model_cfg, stepper.state["params"], setup.data.tokenizer_path)
    total_train_s = prior_train_s + progress.train_s
    steps_done = member.diverged_step if diverged else progress.step
    tokens = steps_done * B * T
    summary = summary_fields(cfg, member, setup, steps_done)
    summary.update(
        wall_s=prior_wall + time.perf_counter() - t_start, compile_s=compile_s,
        tokens_per_s=tokens / total_train_s if total_train_s > 0 else None,
        mfu=(tokens * setup.fpt / total_train_s / setup.peak) if total_train_s > 0 else None)
    summary = write_summary(run_dir, {**summary, **origin}, is_main)
    return summary


# ---------------------------------------------------------------------------------------------------------
# A population of learning rates


def train_population(run_cfgs: Sequence[RunConfig], strategy: str = "map") -> list[dict]:
    """Train runs that differ only in optim.lr together on one device; one summary per member (as `train`).

    Every member gets its own run_dir with config.yaml, metrics.jsonl and summary.json exactly as its solo
    run writes them. Populations do not checkpoint: a killed population starts again,
    and one stopped by SIGTERM/SIGINT stops after its current step and raises `signals.Interrupted` saying
    that nothing was saved. Every member's run_dir is locked for the duration."""
    t_start = time.perf_counter()
    cfgs = list(run_cfgs)
    if sharding.mesh_from_config(cfgs[0].mesh).devices.size != 1:
        raise ValueError("populations train on one device; this mesh has several")
    if objective_of(cfgs[0]).needs_reference:
        raise UserError(f"train.objective {cfgs[0].train.objective} is not supported in a population; train each run")
    cfgs = [resolve_dtype(c) for c in cfgs]
    with contextlib.ExitStack() as held:  # the members' run dirs, locked until their summaries are written
        for c in cfgs:
            held.enter_context(DirLock(Path(c.run_dir).expanduser(), "run_dir"))
        return _train_population(cfgs, strategy, held.enter_context(stop_check()), t_start)


def _train_population(cfgs: list[RunConfig], strategy: str, should_stop: Callable, t_start: float) -> list[dict]:
    base, P = cfgs[0], len(cfgs)
    setup = setup_run(base)
    stepper = PopulationStepper(setup, cfgs, strategy)
    members = [Member(c, _member_logger(c), []) for c in cfgs]
    progress = Progress(0)
    try:
        with steps():
            signum = run_steps(setup, stepper, members, progress, should_stop=should_stop)
    finally:
        _close(setup, [m.logger for m in members])
    if signum is not None:
        raise interrupted(signum, progress.step, None)

    wall = time.perf_counter() - t_start
    compile_s = (stepper.compile_s or 0.0) + setup.compile_eval_s
    B, T = base.train.batch_size, base.train.seq_len
    summaries = []
    for m in members:
        steps_done = m.diverged_step if m.diverged_step is not None else progress.step
        summary = summary_fields(m.cfg, m, setup, steps_done)
        train_s = progress.train_s
        summary.update(  # the population's time, split evenly: what each member cost
            wall_s=wall / P, compile_s=compile_s / P,
            tokens_per_s=progress.step * B * T / train_s if train_s > 0 else None,
            mfu=progress.step * B * T * setup.fpt / train_s / setup.peak if train_s > 0 else None,
            devices=1, processes=1, mode="population",
            population={"size": P, "strategy": strategy, "wall_s": wall, "compile_s": compile_s,
                        "lrs": [c.optim.lr for c in cfgs]})
        summaries.append(write_summary(Path(m.cfg.run_dir).expanduser(), summary, True))
    return summaries


def _member_logger(cfg: RunConfig) -> qmetrics.MetricsLogger:
    run_dir = Path(cfg.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "summary.json").unlink(missing_ok=True)
    qmetrics.truncate_metrics(run_dir / "metrics.jsonl", 0)
    return qmetrics.MetricsLogger(run_dir, total_steps=cfg.train.steps, tensorboard=False, progress=False)
