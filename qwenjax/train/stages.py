"""A staged run: the stages of `stages:` trained in order inside one run directory.

Each stage is a run of its own in `RUN_DIR/stages/<i>/` (`run_config.stage_config`: the run's keys with the
stage's on top), started from stage i - 1's run directory with `model.init_from` (its final checkpoint:
the params, and the Adam state unless the stage says `reset_optimizer: true`). So everything a run does,
a stage does: its own compiled step for its seq_len and RoPE, its own learning-rate schedule, checkpoints,
and a bitwise resume after a kill. Rerunning the command skips the finished stages (their summary.json)
and resumes the current one from its newest checkpoint (whose meta holds its step and data position);
a stage never started begins from its predecessor's final checkpoint.

`RUN_DIR/config.yaml` is the staged config; `RUN_DIR/summary.json` lists the stages (config, steps,
tokens, losses, wall time) over the last stage's fields; `RUN_DIR/model` points at the last stage's model
directory, so `model.init_from: RUN_DIR` continues from it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from qwenjax.errors import UserError
from qwenjax.run_config import RunConfig, save_config, stage_config
from qwenjax.run_stages import short_len_of, stage_name
from qwenjax.train.interrupt import run_dir_lock
from qwenjax.train.run_dir import finished_summary, model_dir_of, write_summary

log = logging.getLogger(__name__)

_SUMMED = ("tokens", "planned_tokens", "steps", "steps_completed", "wall_s", "compile_s", "flops")


def stage_record(cfg: RunConfig, i: int, summary: dict[str, Any]) -> dict[str, Any]:
    """What summary.json says about stage i: its resolved settings and its results."""
    s, sc = cfg.stages[i], stage_config(cfg, i)
    mix = sc.data.length_mix
    config = {"seq_len": sc.train.seq_len, "steps": sc.train.steps, "tokens": sc.train.tokens,
              "batch_size": sc.train.batch_size, "rope_theta": sc.model.rope_theta,
              "rope_scaling": sc.model.rope_scaling, "max_position_embeddings": sc.model.max_position_embeddings,
              "lr": sc.optim.lr, "warmup_steps": sc.optim.warmup_steps,
              "length_mix": mix and {**mix, "short_len": short_len_of(mix, sc.train.seq_len)},
              "resume_optimizer": sc.train.resume_optimizer, "reset_optimizer": s.reset_optimizer}
    return {"index": i, "name": stage_name(i, s), "run_dir": sc.run_dir, "config": config,
            **{k: summary.get(k) for k in ("status", "steps_completed", "tokens", "initial_loss", "final_loss",
                                           "eval_loss", "wall_s", "compile_s", "tokens_per_s", "mfu")}}


def train_stages(cfg: RunConfig, train_one: Callable[[RunConfig], dict], forks: Sequence[RunConfig] = ()) -> dict:
    """Train the stages of `cfg` in order (each with `train_one`, the trainer of one run) and return the
    staged run's summary; a finished staged run returns its summary.json."""
    if forks:
        raise UserError("cooldown forks are not supported in a staged run (stages:)")
    run_dir = Path(cfg.run_dir).expanduser()
    is_main = jax.process_index() == 0
    with run_dir_lock(run_dir, is_main):
        done = finished_summary(run_dir, cfg)
        if done is not None:
            log.info("%s already finished (summary.json); nothing to do", run_dir)
            return done
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        summaries = []
        for i, stage in enumerate(cfg.stages):
            sc = stage_config(cfg, i)
            log.info("%s: stage %d/%d (%s): seq_len %d, %d steps, rope_theta %g", run_dir, i + 1, len(cfg.stages),
                     stage_name(i, stage), sc.train.seq_len, sc.train.steps, sc.model.rope_theta or 0.0)
            summaries.append(train_one(sc))
            if summaries[-1].get("diverged"):
                log.warning("%s: stage %d diverged; the later stages are not trained", run_dir, i)
                break
        return _finish(cfg, run_dir, summaries, is_main)


def _finish(cfg: RunConfig, run_dir: Path, summaries: list[dict], is_main: bool) -> dict:
    last = summaries[-1]
    summary = {k: v for k, v in last.items() if k not in ("init_from", "fork_of", "fork_step")}
    for key in _SUMMED:
        values = [s.get(key) for s in summaries]
        summary[key] = sum(values) if all(v is not None for v in values) else None
    if cfg.model.init_from:
        summary["init_from"] = str(Path(cfg.model.init_from).expanduser().resolve())
    summary.update(run_dir=str(run_dir), stages=[stage_record(cfg, i, s) for i, s in enumerate(summaries)])
    final_model = model_dir_of(Path(last["run_dir"]))
    link = model_dir_of(run_dir)
    if is_main and final_model.is_dir() and not last.get("diverged"):
        if link.is_symlink():
            link.unlink()
        if not link.exists():
            os.symlink(os.path.relpath(final_model, run_dir), link, target_is_directory=True)
    return write_summary(run_dir, summary, is_main)

