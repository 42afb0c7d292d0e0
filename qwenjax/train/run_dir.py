"""A run directory: whether it holds this run, when a run writes what, its summary, its final model
directory, and forks handed over to it.

Layout: `config.yaml`, `metrics.jsonl`, `ckpt/<step>/` (train state + JSON meta, `qwenjax.train.checkpoint`),
`model/` (the final params as a model directory, `qwenjax.model_io`: what `model.init_from` and
`qwenjax convert --to-hf` read; written when checkpoints are enabled and the run did not diverge), and
`summary.json`, written last: a run directory with a complete summary is a finished run.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from qwenjax import model_io
from qwenjax.config import ModelConfig, param_counts
from qwenjax.errors import UserError
from qwenjax.run_config import (
    RunConfig,
    atomic_write_text,
    config_to_dict,
    load_config,
    model_config,
    planned_tokens,
    save_config,
)
from qwenjax.train import optim
from qwenjax.train.checkpoint import Checkpointer
from qwenjax.train.metrics import write_metrics
from qwenjax.train.step import abstract_state

MODEL_DIR = "model"

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


def check_same_run(run_dir: Path, cfg: RunConfig) -> bool:
    """Compare with `<run_dir>/config.yaml`; UserError if it is another experiment. True if identical."""
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


def finished_summary(run_dir: Path, cfg: RunConfig) -> dict | None:
    """The summary of an identical run that already finished (rerunning it is a no-op)."""
    same = check_same_run(run_dir, cfg)
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


def write_fork(fork: RunConfig, step: int, state, meta: dict[str, Any], records: list[dict],
                is_main: bool) -> None:
    """Make `fork`'s run directory hold this run's state after `step` steps, as if the fork had trained to
    there and checkpointed: its config, the metrics records its own cadence logs up to `step`, and a complete
    checkpoint (saved synchronously, last, so a kill leaves either a resumable fork or none)."""
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


# ---------------------------------------------------------------------------------------------------------
# Summary


def _mean_last(values: list[float], fraction: float = 0.1) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    n = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(values[-n:]))


def summary_fields(cfg: RunConfig, member, setup, steps_done: int) -> dict[str, Any]:
    """The summary of one run (solo or population member) except its timings, which the caller sets:
    `wall_s`, `compile_s`, `tokens_per_s`, `mfu` (placed here so every summary lists fields alike)."""
    mc, B, T = setup.model_cfg, cfg.train.batch_size, cfg.train.seq_len
    n_total, n_non_embedding = param_counts(mc)
    diverged = member.diverged_step is not None
    tokens = steps_done * B * T
    return {
        "run_dir": str(Path(cfg.run_dir).expanduser()), "complete": True,
        "status": "diverged" if diverged else "ok", "n_params": n_non_embedding, "n_params_total": n_total,
        "tokens": tokens, "planned_tokens": planned_tokens(cfg),
        "steps": cfg.train.steps, "steps_completed": steps_done, "batch_size": B, "seq_len": T,
        "batch_tokens": B * T, "lr": cfg.optim.lr,
        "final_loss": _mean_last([r.get("loss") for r in member.records]),
        "eval_loss": None if diverged else member.eval_loss,
        "initial_loss": member.initial_loss, "diverged": diverged, "diverged_step": member.diverged_step,
        "wall_s": None, "compile_s": None, "flops": setup.fpt * tokens, "flops_per_token": setup.fpt,
        "tokens_per_s": None, "mfu": None, "peak_flops": setup.peak, "peak_flops_source": setup.peak_source,
        "unigram_entropy": setup.data.caches[0].unigram_entropy("heldout"),
        "vocab_size": mc.vocab_size, "tokenizer": str(setup.data.tokenizer_path),
        "schedule": cfg.optim.schedule, "warmup_steps": cfg.optim.warmup_steps,
        "weight_decay": cfg.optim.weight_decay, "seed": cfg.seed,
        "mesh": dict(setup.mesh.shape), "devices": jax.device_count(), "processes": jax.process_count(),
        "platform": jax.devices()[0].platform, "hparams": cfg.hparams,
    }


def write_summary(run_dir: Path, summary: dict[str, Any], is_main: bool) -> dict[str, Any]:
    """Non-finite floats become null; written atomically (last: it marks the run finished)."""
    summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    if is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------------------
# The final model directory, and export


def model_dir_of(run_dir: Path) -> Path:
    return Path(run_dir) / MODEL_DIR


def write_model(directory: Path, model_cfg: ModelConfig, params, tokenizer: str | Path | None = None) -> Path:
    """The run's params as a model directory, with its tokenizer beside them (what `generate` looks for).
    Every process calls it (Orbax coordinates the write)."""
    model_io.save_model(directory, model_cfg, params, overwrite=True)
    if tokenizer is not None and jax.process_index() == 0:
        copy_tokenizer(Path(tokenizer).expanduser(), directory)
    return directory


def copy_tokenizer(source: Path, directory: Path) -> None:
    """A sentencepiece `.model` file, or a folder's tokenizer files (tokenizer*.json, *.model, vocab, merges)."""
    files = [source] if source.is_file() else [
        f for pattern in ("tokenizer*.json", "*.model", "vocab.json", "merges.txt", "special_tokens_map.json")
        for f in sorted(source.glob(pattern))]
    for f in files:
        if f.is_file():
            shutil.copy2(f, directory / f.name)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "ckpt").glob("*") if p.name.isdigit())


def run_model_config(run_dir: Path, ckpt: Checkpointer | None = None, step: int | None = None) -> ModelConfig:
    """The model of a run directory: from its checkpoint's meta, else its config.yaml and summary.json."""
    if ckpt is not None and step is not None:
        saved = ckpt.restore_meta(step).get("model_config")
        if saved:
            return model_io.config_from_dict(saved, f"{run_dir}/ckpt/{step}")
    cfg = load_config(run_dir / "config.yaml")
    vocab = cfg.model.vocab_size
    summary = run_dir / "summary.json"
    if not vocab and summary.is_file():
        vocab = json.loads(summary.read_text()).get("vocab_size")
    if not vocab:
        raise UserError(f"{run_dir}: its vocabulary size is unknown (no model.vocab_size, no summary.json)")
    return model_config(cfg, vocab_size=vocab)


def restore_run_state(run_dir: Path, shardings=None, expect=None) -> tuple[ModelConfig, dict, int]:
    """(model config, train state, step) of the newest checkpoint of `run_dir`, placed on `shardings` (a
    function of the abstract state; default: the first local device). UserError if there is none.
    `expect(model_config)` may reject the run's model before anything is read."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise UserError(f"{run_dir} holds no checkpoint (ckpt/<step>/); train it, or enable checkpoints")
    ckpt = Checkpointer(run_dir / "ckpt", keep=len(steps) + 1, use_async=False)
    try:
        model_cfg = run_model_config(run_dir, ckpt, steps[-1])
        if expect is not None:
            expect(model_cfg)
        abstract = abstract_state(model_cfg)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        sh = shardings(abstract) if shardings is not None else jax.tree.map(lambda _: device, abstract)
        rep = jax.tree.leaves(sh)[0] if shardings is None else jax.sharding.NamedSharding(
            jax.tree.leaves(sh)[0].mesh, jax.sharding.PartitionSpec())
        target = {"train": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                        abstract, sh),
                  "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
        try:
            step, saved, _ = ckpt.restore(target, step=steps[-1])
        except UserError as e:
            raise UserError(f"{run_dir}: its newest checkpoint does not restore as its configured model "
                            f"({str(e)[:200]})") from None
    finally:
        ckpt.close()
    return model_cfg, saved["train"], step


def export_model(run_dir: str | Path, to: str | Path) -> Path:
    """Write the model directory of a run (its newest checkpoint's params, else its `model/`) to `to`."""
    run_dir, to = Path(run_dir).expanduser(), Path(to).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    if model_io.is_model_dir(to):
        raise UserError(f"{to} already holds a model checkpoint; choose a new folder")
    if checkpoint_steps(run_dir):
        model_cfg, state, _ = restore_run_state(run_dir)
        summary = run_dir / "summary.json"
        tokenizer = json.loads(summary.read_text()).get("tokenizer") if summary.is_file() else None
        if tokenizer is None and model_io.is_model_dir(model_dir_of(run_dir)):
            tokenizer = model_dir_of(run_dir)
        write_model(to, model_cfg, state["params"])
        if tokenizer is not None and Path(tokenizer).exists():
            copy_tokenizer(Path(tokenizer), to)
        return to
    if model_io.is_model_dir(model_dir_of(run_dir)):
        shutil.copytree(model_dir_of(run_dir), to, dirs_exist_ok=True)
        return to
    raise UserError(f"{run_dir} holds no checkpoint and no model directory (checkpoint.enabled was false?)")
