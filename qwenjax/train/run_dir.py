"""A run directory: whether it holds this run, when a run writes what, and forks handed over to it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qwenjax.errors import UserError
from qwenjax.run_config import RunConfig, config_to_dict, save_config
from qwenjax.train import optim
from qwenjax.train.checkpoint import Checkpointer

# Keys whose change makes a saved run a different run (resuming it would mix two experiments).
_IDENTITY_SECTIONS = ("model", "data")
_IDENTITY_KEYS = ("seed", "train.batch_size", "train.seq_len", "train.grad_accum")


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and k != "hparams":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_run(run_dir: Path, cfg: RunConfig) -> bool:
    """Compare with `<run_dir>/config.yaml`; UserError if it is another experiment. True if identical."""
    import yaml

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return False
    try:
        saved = _flatten(yaml.safe_load(saved_file.read_text()) or {})
    except yaml.YAMLError:
        return False
    new = _flatten(config_to_dict(cfg))
    for key in sorted(set(saved) | set(new)):
        identity = key in _IDENTITY_KEYS or key.split(".")[0] in _IDENTITY_SECTIONS
        if identity and saved.get(key) != new.get(key):
            raise UserError(f"{run_dir} holds a run with {key} = {saved.get(key)!r}, not {new.get(key)!r}; "
                            "use another run_dir (or delete that one)")
    return saved == new


def _finished_summary(run_dir: Path, cfg: RunConfig) -> dict | None:
    """The summary of an identical run that already finished (rerunning it is a no-op)."""
    same = _check_same_run(run_dir, cfg)
    f = run_dir / "summary.json"
    if same and f.is_file():
        try:
            summary = json.loads(f.read_text())
        except ValueError:
            return None
        if summary.get("complete"):
            return summary
    return None


def fork_steps(cfg: RunConfig, forks: Sequence[RunConfig]) -> dict[int, list[RunConfig]]:
    """{step: forks that start from this run's state after that many steps}: each fork's WSD decay start.

    A fork must be this run with fewer train.steps (any other difference would change its first steps), and
    the schedule WSD, whose stable phase is the same for every length. Forks that start at step 0 are left
    out: they share nothing."""
    same = {k: v for k, v in _flatten(config_to_dict(cfg)).items() if k not in ("train.steps", "run_dir")}
    out: dict[int, list[RunConfig]] = {}
    for fork in forks:
        differs = [k for k, v in _flatten(config_to_dict(fork)).items()
                   if k not in ("train.steps", "run_dir") and same.get(k) != v]
        if differs:
            raise UserError(f"fork {fork.run_dir} differs from {cfg.run_dir} in {differs[0]}, not only in "
                            "train.steps")
        if cfg.optim.schedule != "wsd":
            raise UserError(f"forks need optim.schedule: wsd (the stable phase they share), got "
                            f"{cfg.optim.schedule!r}")
        if not cfg.checkpoint.enabled:
            raise UserError("forks need checkpoint.enabled: true (a fork resumes from a checkpoint)")
        if fork.train.steps >= cfg.train.steps:
            raise UserError(f"fork {fork.run_dir} has {fork.train.steps} train.steps, not fewer than "
                            f"{cfg.train.steps}")
        step = optim.wsd_decay_start(fork.train.steps, fork.optim.decay_fraction, fork.optim.warmup_steps)
        if step > 0:
            out.setdefault(step, []).append(fork)
    return out


def _write_fork(fork: RunConfig, step: int, state, meta: dict[str, Any], records: list[dict],
                is_main: bool) -> None:
    """Make `fork`'s run directory hold this run's state after `step` steps, as if the fork had trained to
    there and checkpointed: its config, the metrics records its own cadence logs up to `step`, and a complete
    checkpoint (saved synchronously, last, so a kill leaves either a resumable fork or none)."""
    from qwenjax.train.metrics import write_metrics

    fork_dir = Path(fork.run_dir).expanduser()
    if (fork_dir / "summary.json").is_file() or any(
            p.name.isdigit() for p in (fork_dir / "ckpt").glob("*")):
        return  # the fork has its own state already (trained, or resumed from an earlier hand-over)
    if is_main:
        fork_dir.mkdir(parents=True, exist_ok=True)
        save_config(fork, fork_dir / "config.yaml")
        write_metrics(fork_dir / "metrics.jsonl", [r for r in records if step_events(fork, r["step"])[2]])
    ckpt = Checkpointer(fork_dir / "ckpt", keep=fork.checkpoint.keep, use_async=False)
    try:
        ckpt.save(step, state, meta)
    finally:
        ckpt.close()



def step_events(cfg: RunConfig, step: int) -> tuple[bool, bool, bool]:
    """(evaluate now, checkpoint now, fetch metrics now) after `step` steps: the one cadence that
    solo runs and populations share, so a population member logs exactly the records its solo run would."""
    last = step == cfg.train.steps
    do_eval = bool(last or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0))
    do_ckpt = bool(cfg.checkpoint.enabled and (
        last or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)))
    fetch = do_eval or do_ckpt or step % cfg.train.log_every == 0 or step == 1
    return do_eval, do_ckpt, fetch
