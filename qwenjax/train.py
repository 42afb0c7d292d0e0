"""The training loop and its pure parts.

Pure, jit/vmap-able pieces (what the sweep's learning-rate populations vmap over `(state, hp)`):

    init_train_state(model_cfg, rng) -> state = {"params", "opt_state", "step"}
    make_hparams(run_cfg) -> hp = {"lr", "warmup_steps", "total_steps", ...: float32 scalars}
    train_step(state, batch, hp, *, model_cfg, optim_static) -> (state, {"loss", "grad_norm", "lr"})
    eval_step(params, batch, *, model_cfg) -> (sum of token losses, number of tokens)

`train(run_cfg) -> summary` is the whole run: data (tokenised once into the shared on-disk cache), mesh
and shardings, state created directly sharded (eval_shape + jit(out_shardings)) or restored from the
newest checkpoint in the run directory, the jitted step with donated state, logging, eval, checkpoints,
divergence detection, and `summary.json`. It runs unchanged on one CPU, a multi-GPU host or a TPU pod
(every process runs it; each feeds its own rows of the global batch).

Loss: mean next-token cross-entropy over the tokens with loss_mask 1 (in float32), optionally plus
z_loss x mean(logsumexp(logits)^2). With grad_accum k, the batch's rows are split into k micro-batches
(row r goes to micro-batch r mod k) whose summed gradients are divided by the total token count, so k
micro-batches equal one k-times-larger batch.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import model as qmodel
from qwenjax import optim, sharding
from qwenjax.checkpoint import Checkpointer, abstract_with_shardings
from qwenjax.config import ModelConfig, flops_per_token
from qwenjax.errors import UserError
from qwenjax.optim import OptimStatic
from qwenjax.run_config import (
    RunConfig,
    atomic_write_text,
    config_to_dict,
    data_parallel_size,
    missing_keys,
    model_config,
    planned_tokens,
    save_config,
)

log = logging.getLogger(__name__)

State = dict[str, Any]
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
                "loss_mask": jnp.float32}


# ---------------------------------------------------------------------------------------------------------
# Pure functions


def init_train_state(model_cfg: ModelConfig, rng) -> State:
    """Fresh parameters, zero Adam moments and step 0 (float32 master weights when param_dtype is)."""
    params = qmodel.init_params(model_cfg, rng)
    return {"params": params, "opt_state": optim.init_opt_state(params), "step": jnp.zeros((), jnp.int32)}


def make_hparams(run_cfg: RunConfig) -> dict[str, jax.Array]:
    """The traced hyperparameters of a run (float32 scalars; see qwenjax.optim.HP_KEYS)."""
    o = run_cfg.optim
    return optim.make_hp(lr=o.lr, warmup_steps=o.warmup_steps, total_steps=run_cfg.train.steps,
                         min_lr_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction,
                         weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm,
                         z_loss=o.z_loss)


def make_optim_static(run_cfg: RunConfig) -> OptimStatic:
    return OptimStatic(schedule=run_cfg.optim.schedule, grad_accum=run_cfg.train.grad_accum,
                       decay_embeddings=run_cfg.optim.decay_embeddings, decay_shape=run_cfg.optim.decay_shape)


def loss_terms(params, batch, model_cfg: ModelConfig):
    """(sum of token cross-entropies, sum of logsumexp^2, number of tokens), all float32, over loss_mask."""
    logits_BTV, _ = qmodel.apply(model_cfg, params, batch["inputs"], positions=batch["positions"],
                                 segment_ids=batch["segment_ids"])
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((lse_BT - target_BT) * mask_BT), jnp.sum(lse_BT * lse_BT * mask_BT), jnp.sum(mask_BT)


def mean_gradients(params, batch, hp, *, model_cfg: ModelConfig, grad_accum: int = 1):
    """(gradient of the mean token loss (+ z-loss), mean token loss) over a [B, T] batch, accumulated over
    `grad_accum` micro-batches with lax.scan: summed per micro-batch, divided once by the total token count,
    so the result equals that of one batch (up to float32 rounding)."""

    def objective(p, micro):
        nll, z, count = loss_terms(p, micro, model_cfg)
        return nll + hp["z_loss"] * z, (nll, count)

    grad_fn = jax.grad(objective, has_aux=True)
    k = grad_accum
    if k == 1:
        grads, (nll, count) = grad_fn(params, batch)
    else:
        # [B, T] -> [k, B/k, T]: micro-batch j = rows j, j+k, ...; each stays split evenly over the
        # data-parallel devices (a device's rows are a contiguous block whose size B/k divides).
        micro_KBT = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, micro):
            g_acc, nll_acc, n_acc = carry
            g, (nll_i, n_i) = grad_fn(params, micro)
            return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g), nll_acc + nll_i,
                    n_acc + n_i), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, nll, count), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro_KBT)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return grads, nll / denom


def train_step(state: State, batch, hp, *, model_cfg: ModelConfig, optim_static: OptimStatic):
    """One optimizer step on a global batch of [B, T] arrays. Pure: jit it with shardings, or vmap it over
    (state, hp) for a population of learning rates. Returns (new state, {"loss", "grad_norm", "lr"})."""
    grads, loss = mean_gradients(state["params"], batch, hp, model_cfg=model_cfg,
                                 grad_accum=optim_static.grad_accum)
    params, opt_state, grad_norm, lr = optim.apply_updates(state["params"], grads, state["opt_state"],
                                                           state["step"], hp, optim_static)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": lr}


def eval_step(params, batch, *, model_cfg: ModelConfig):
    """(sum of token losses, token count) of one held-out batch."""
    nll, _, count = loss_terms(params, batch, model_cfg)
    return nll, count


# ---------------------------------------------------------------------------------------------------------
# Compiled functions, cached per process: runs of equal shapes (a sweep in one process, the tests) compile
# each once. JAX's persistent compilation cache covers separate processes.

_COMPILED: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
_COMPILED_MAX = 24  # executables kept (a sweep in one process visits a few shapes many times)


def _remember(key: tuple, value):
    _COMPILED[key] = value
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return value


@functools.lru_cache(maxsize=16)
def _abstract_state(model_cfg: ModelConfig):
    """Shapes and dtypes of the train state (jax.ShapeDtypeStruct leaves; traced once per config)."""
    return jax.eval_shape(functools.partial(init_train_state, model_cfg), jax.random.key(0))


def _abstract_batch(batch_size: int, seq_len: int, shard) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=shard)
            for k, dtype in BATCH_DTYPES.items()}


def compiled_train_step(model_cfg: ModelConfig, static: OptimStatic, mesh, batch_size: int, seq_len: int):
    """(compiled step, seconds spent compiling now: 0 when cached). Signature: (state, batch, hp)."""
    key = ("train", model_cfg, static, mesh, batch_size, seq_len)
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    abstract = _abstract_state(model_cfg)
    state_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    rep = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    fn = jax.jit(functools.partial(train_step, model_cfg=model_cfg, optim_static=static),
                 in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep), donate_argnums=(0,))
    abstract_sh = abstract_with_shardings(abstract, state_sh)
    hp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                      optim.make_hp(lr=1.0, warmup_steps=0, total_steps=1))
    t0 = time.perf_counter()
    lowered = fn.lower(abstract_sh, _abstract_batch(batch_size, seq_len, batch_sh), hp)
    compiled = _remember(key, lowered.compile())
    return compiled, time.perf_counter() - t0


def compiled_eval_step(model_cfg: ModelConfig, mesh, batch_size: int, seq_len: int):
    key = ("eval", model_cfg, mesh, batch_size, seq_len)
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    abstract = _abstract_state(model_cfg)["params"]
    param_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    rep = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    fn = jax.jit(functools.partial(eval_step, model_cfg=model_cfg), in_shardings=(param_sh, batch_sh),
                 out_shardings=rep)
    abstract_sh = abstract_with_shardings(abstract, param_sh)
    t0 = time.perf_counter()
    compiled = _remember(key, fn.lower(abstract_sh, _abstract_batch(batch_size, seq_len, batch_sh)).compile())
    return compiled, time.perf_counter() - t0


def init_state_sharded(model_cfg: ModelConfig, rng, mesh) -> State:
    """The train state created directly on its shardings (no full copy on one device first)."""
    abstract = _abstract_state(model_cfg)
    state_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    key = ("init", model_cfg, mesh)
    init = _COMPILED.get(key) or _remember(
        key, jax.jit(functools.partial(init_train_state, model_cfg), out_shardings=state_sh))
    return init(rng)


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class DataSetup:
    tokenizer_path: Path
    caches: list  # qwenjax.data.TokenCache, one per source
    weights: list[float]
    vocab_size: int
    eos_id: int


def _limit_files(files: list[Path], max_bytes: int | None) -> list[Path]:
    """The first files whose sizes add up to max_bytes (all files without a limit)."""
    if max_bytes is None:
        return files
    out, total = [], 0
    for f in files:
        out.append(f)
        total += f.stat().st_size
        if total >= max_bytes:
            break
    return out


def ensure_tokenizer(files: list[Path], vocab_size: int, cache_root: Path) -> Path:
    """A sentencepiece tokenizer trained once on `files` with `vocab_size`, cached under
    `cache_root/tokenizers/<key>/` (key: file paths, sizes, mtimes and vocab size), file-locked so that
    concurrent runs train it once."""
    from qwenjax.tokenizer import train_tokenizer

    entries = [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps([entries, int(vocab_size)]).encode()).hexdigest()[:20]
    folder = cache_root / "tokenizers" / key
    model = folder / "tokenizer.model"
    if model.is_file():
        return model
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not model.is_file():
            log.info("training a %d-token tokenizer on %d files (cached in %s)", vocab_size, len(files),
                     folder)
            train_tokenizer(files, folder / "tokenizer", vocab_size)
    return model


def prepare_data(cfg: RunConfig) -> DataSetup:
    """Resolve the corpus, the tokenizer (trained once if not given) and the token caches (built once)."""
    from qwenjax.data import build_token_cache, default_corpus_files, resolve_files

    d = cfg.data
    cache_root = d.resolved_cache_dir()
    sources = []
    for path, weight in d.weighted_paths():
        if path is None:
            files = default_corpus_files(d.max_bytes)
        else:
            files = _limit_files(resolve_files(path), d.max_bytes)
        if not files:
            raise UserError(f"data path {path} holds no files")
        sources.append((path, files, weight))
    if d.tokenizer:
        tok_path = Path(d.tokenizer).expanduser()
    else:
        all_files = list(dict.fromkeys(f for _, files, _ in sources for f in files))
        tok_path = ensure_tokenizer(all_files, d.vocab_size, cache_root)
    caches = []
    for path, files, _ in sources:
        cache = build_token_cache(files, tok_path, cache_root / "tokens", heldout_fraction=d.heldout_fraction,
                                  max_bytes=d.max_bytes)
        if len(cache.train_tokens) == 0:
            raise UserError(f"the corpus {path or 'stdlib'} holds no text (0 training tokens)")
        caches.append(cache)
    _assert_same_everywhere(caches[0].tokenizer_fingerprint + "".join(c.key for c in caches),
                            "tokenizer / token cache")
    return DataSetup(tok_path, caches, [w for _, _, w in sources], caches[0].vocab_size, caches[0].eos_id)


def _assert_same_everywhere(text: str, what: str) -> None:
    """Multi-process: every process must have tokenised the data identically."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], dtype=np.uint32)
    first = multihost_utils.broadcast_one_to_all(digest)
    if not np.array_equal(np.asarray(first), digest):
        raise UserError(f"the {what} differs between processes; give data.tokenizer explicitly and "
                        "put data.cache_dir on a shared filesystem")


# ---------------------------------------------------------------------------------------------------------
# --hparams FIT.json


HPARAM_KEYS = ("optim.lr", "train.batch_size", "train.steps")


def apply_hparams(cfg: RunConfig, fit_path: str | os.PathLike, explicit: Mapping[str, Any] | None = None,
                  *, num_devices: int | None = None) -> tuple[RunConfig, list[str]]:
    """Set optim.lr and train.batch_size from the fit's prediction at (N, D) of this config, keeping D
    (train.steps = round(D / (batch_size x seq_len))). Keys in `explicit` (command-line overrides) win.
    Returns (new config, notes for the log); provenance goes to `hparams`."""
    from qwenjax.model import count_params
    from qwenjax.scaling import load_fit, predict

    fit = load_fit(fit_path)
    explicit = dict(explicit or {})
    mc = model_config(cfg, vocab_size=cfg.model.vocab_size or 1)  # N excludes the embedding
    n_params = count_params(mc)[1]
    tokens = planned_tokens(cfg)
    seq_len = cfg.train.seq_len
    dp = data_parallel_size(cfg.mesh)
    if dp is None:
        n = num_devices if num_devices is not None else jax.device_count()
        shape = sharding.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, n)
        dp = shape[0] * shape[1]
    prediction = predict(fit, n_params, tokens, seq_len=seq_len, multiple_of=dp * cfg.train.grad_accum)
    batch_size = int(prediction["batch_size"])
    proposed = {"optim.lr": float(prediction["lr"]), "train.batch_size": batch_size,
                "train.steps": max(1, round(tokens / (batch_size * seq_len)))}
    notes = [f"--hparams {fit_path}: N = {n_params:,} non-embedding params, D = {tokens:,} tokens -> "
             f"lr {prediction['lr']:.4g}, batch {batch_size} sequences "
             f"({prediction['batch_tokens']:.4g} tokens)"]
    applied, overridden = {}, {}
    for key, value in proposed.items():
        if key in explicit:
            section, name = key.split(".")
            used = getattr(getattr(cfg, section), name)
            overridden[key] = {"predicted": value, "used": used}
            notes.append(f"--hparams: {key} = {used} from the command line wins over the predicted {value}")
        else:
            applied[key] = value
    if "train.steps" in applied:
        notes.append(f"--hparams: train.steps = {applied['train.steps']} (was {cfg.train.steps}) keeps D = "
                     f"{tokens:,} planned tokens at the new batch size")
    if prediction.get("warning"):
        notes.append(f"--hparams: {prediction['warning']}")
    provenance = {"source": str(Path(fit_path).expanduser().resolve()), "prediction": prediction,
                  "n_params": n_params, "tokens": tokens, "applied": applied, "overridden": overridden}
    new = cfg.replace(**applied, hparams=provenance)
    return new, notes


# ---------------------------------------------------------------------------------------------------------
# The run


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


def _setup_compilation_cache(cache_root: Path) -> None:
    if os.environ.get("QWENJAX_COMPILATION_CACHE", "1").lower() in ("0", "false", "no"):
        return
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root / "jax"))


def heldout_loss(eval_fn, params, eval_sets, weights) -> tuple[float, dict[str, float]]:
    """(weighted mean held-out loss per token over the sources, per-source losses when there are several)."""
    losses = []
    for batches in eval_sets:
        sums = [eval_fn(params, b) for b in batches]
        nll, count = (float(sum(x)) for x in zip(*jax.device_get(sums), strict=True))
        losses.append(nll / max(count, 1.0))
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    per_source = {f"eval_loss_{i}": v for i, v in enumerate(losses)} if len(losses) > 1 else {}
    return float(np.dot(w, losses)), per_source


def step_events(cfg: RunConfig, step: int) -> tuple[bool, bool, bool]:
    """(evaluate now, checkpoint now, fetch metrics now) after `step` steps: the one cadence that
    solo runs and populations share, so a population member logs exactly the records its solo run would."""
    last = step == cfg.train.steps
    do_eval = bool(last or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0))
    do_ckpt = bool(cfg.checkpoint.enabled and (
        last or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)))
    fetch = do_eval or do_ckpt or step % cfg.train.log_every == 0 or step == 1
    return do_eval, do_ckpt, fetch


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
    from qwenjax.metrics import write_metrics

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


def _mean_last(values: list[float], fraction: float = 0.1) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    n = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(values[-n:]))


def train(cfg: RunConfig, forks: Sequence[RunConfig] = ()) -> dict[str, Any]:
    """Run (or resume, or return the summary of an already finished identical run) and return the summary.

    Divergence (a non-finite loss, or a loss above train.divergence_factor x the first step's) stops the run
    early with `diverged: true` in the summary; it is a result, not an error.

    `forks`: configs of shorter WSD runs that differ from this one only in train.steps and run_dir. When this
    run reaches a fork's decay start (`fork_steps`), it writes its complete state there (checkpoint, metrics
    so far, config), so `train(fork)` resumes from it and trains only the fork's cooldown, bit-identical to
    training the fork from scratch. A fork that already has a checkpoint or a summary is left alone.
    """
    from qwenjax import metrics as qmetrics
    from qwenjax.data import make_eval_batches, make_train_iterator

    t_start = time.perf_counter()
    sharding.maybe_initialize_distributed()
    unset = missing_keys(cfg)
    if unset:
        raise UserError(f"{unset[0]} is not set (the config has ???); pass {unset[0]}=VALUE")
    forks_at = fork_steps(cfg, forks)
    run_dir = Path(cfg.run_dir).expanduser()
    done = _finished_summary(run_dir, cfg)
    if done is not None:
        log.info("%s already finished (summary.json); nothing to do", run_dir)
        return done
    is_main = jax.process_index() == 0

    # Mesh and data (all validation before anything is written to the run directory).
    mesh = sharding.mesh_from_config(cfg.mesh)
    B, T, k = cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum
    dp = sharding.data_parallel_size(mesh)
    if (B // k) % dp:
        raise UserError(f"train.batch_size ({B}) / train.grad_accum ({k}) = {B // k} is not divisible by the "
                        f"data-parallel size mesh.data x mesh.fsdp = {dp}")
    _setup_compilation_cache(cfg.data.resolved_cache_dir())
    data = prepare_data(cfg)
    model_cfg = model_config(cfg, vocab_size=data.vocab_size)
    if data.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {data.vocab_size} tokens but model.vocab_size is "
                        f"{model_cfg.vocab_size}")
    block, n_blocks = sharding.process_batch_block(mesh, B)
    train_iter = make_train_iterator(data.caches, data.weights, seq_len=T, global_batch_size=B, seed=cfg.seed,
                                     process_index=block, process_count=n_blocks)
    eval_bs = B // k
    e_block, e_blocks = sharding.process_batch_block(mesh, eval_bs)
    eval_sets = [[sharding.global_batch(b, mesh, eval_bs) for b in make_eval_batches(
        c, seq_len=T, batch_size=eval_bs, num_batches=cfg.eval.num_batches(eval_bs), process_index=e_block,
        process_count=e_blocks)] for c in data.caches]

    n_total, n_non_embedding = qmodel.count_params(model_cfg)
    fpt = flops_per_token(model_cfg, T)
    static = make_optim_static(cfg)
    hp = jax.device_put(make_hparams(cfg), sharding.replicated(mesh))
    abstract = _abstract_state(model_cfg)
    state_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    rep = sharding.replicated(mesh)
    rng = jax.random.key(cfg.seed)
    # The key as a replicated global array (Orbax saves only global arrays in multi-process runs).
    rng_host = np.asarray(jax.random.key_data(rng))
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
        train_iter.set_state(meta["data"])
        log.info("resuming %s from step %d", run_dir, start_step)
    else:
        start_step = 0
        state = _initial_state(cfg, model_cfg, rng, mesh, state_sh)
    origin = {k: meta[k] for k in ("fork_of", "fork_step") if k in meta}  # a fork keeps saying it is one
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        records = qmetrics.truncate_metrics(run_dir / "metrics.jsonl", start_step)
    else:
        records = []

    peak, peak_source = qmetrics.peak_flops(mesh.devices.flat)
    step_fn, compile_train_s = compiled_train_step(model_cfg, static, mesh, B, T)
    eval_fn, compile_eval_s = compiled_eval_step(model_cfg, mesh, eval_bs, T)
    compile_s = float(meta.get("compile_s", 0.0)) + compile_train_s + compile_eval_s
    logger = qmetrics.MetricsLogger(run_dir, total_steps=cfg.train.steps, start_step=start_step,
                                    enabled=is_main)
    logger.message(
        f"{run_dir}: N = {n_non_embedding:,} non-embedding params ({n_total:,} total), "
        f"D = {planned_tokens(cfg):,} tokens ({cfg.train.steps} steps x {B} x {T}), "
        f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices "
        f"({jax.process_count()} processes), compile {compile_train_s + compile_eval_s:.1f} s, "
        f"peak {peak / 1e9:,.1f} GFLOP/s ({peak_source})")

    def evaluate(params) -> tuple[float, dict[str, float]]:
        return heldout_loss(eval_fn, params, eval_sets, data.weights)

    def checkpoint_meta() -> dict[str, Any]:
        return {"data": train_iter.get_state(), "initial_loss": initial_loss,
                "wall_s": prior_wall + time.perf_counter() - t_start, "train_s": prior_train_s + train_s,
                "compile_s": compile_s, "step": step, **origin}

    def write_forks(fork_cfgs) -> float:
        """Hand this run's state after `step` steps to the forks that start here; returns the seconds taken."""
        t0 = time.perf_counter()
        fork_meta = {**checkpoint_meta(), "fork_of": str(run_dir), "fork_step": step}
        for fork in fork_cfgs:
            _write_fork(fork, step, {"train": state, "rng": rng_data}, fork_meta, records, is_main)
        return time.perf_counter() - t0

    initial_loss = meta.get("initial_loss")
    prior_wall = float(meta.get("wall_s", 0.0))
    prior_train_s = float(meta.get("train_s", 0.0))
    train_s = 0.0  # time in steps of this invocation (excluding eval and checkpoint saves)
    diverged, diverged_step, eval_loss = False, None, None
    step = start_step
    pending: list[tuple[int, dict]] = []
    mark_time, mark_step = time.perf_counter(), step

    try:
        while step < cfg.train.steps and not diverged:
            batch = sharding.global_batch(next(train_iter), mesh, B)
            state, step_metrics = step_fn(state, batch, hp)
            step += 1
            pending.append((step, step_metrics))
            do_eval, do_ckpt, fetch = step_events(cfg, step)
            forks_here = forks_at.get(step, ())
            if not (fetch or forks_here):
                continue
            fetched = jax.device_get([m for _, m in pending])
            now = time.perf_counter()
            record_step, values = pending[-1][0], fetched[-1]
            for (s, _), m in zip(pending, fetched, strict=True):
                loss = float(m["loss"])
                if initial_loss is None:
                    initial_loss = loss
                if not math.isfinite(loss) or loss > cfg.train.divergence_factor * initial_loss:
                    diverged, diverged_step, record_step, values = True, s, s, m
                    break
            if forks_here and not diverged and not fetch:  # between logged steps: hand over, log nothing
                mark_time += write_forks(forks_here)
                continue
            train_s += now - mark_time
            tokens_per_s = (step - mark_step) * B * T / max(now - mark_time, 1e-9)
            pending.clear()
            record = {"step": record_step, "loss": float(values["loss"]), "lr": float(values["lr"]),
                      "grad_norm": float(values["grad_norm"]), "tokens": record_step * B * T,
                      "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * fpt / peak}
            if diverged:
                logger.message(f"diverged at step {diverged_step}: loss {record['loss']:.4g} "
                               f"(initial {initial_loss:.4g}, limit x{cfg.train.divergence_factor})")
            elif do_eval:
                eval_loss, per_source = evaluate(state["params"])
                record.update(eval_loss=eval_loss, **per_source)
            records.append(record)
            logger.log(record)
            if forks_here and not diverged:  # before this run's own checkpoint: a resume never skips a fork
                write_forks(forks_here)
            if do_ckpt and not diverged:
                ckpt.save(step, {"train": state, "rng": rng_data}, checkpoint_meta())
            mark_time, mark_step = time.perf_counter(), step
        if not diverged and eval_loss is None:  # resumed at the very end: evaluate once more
            eval_loss, _ = evaluate(state["params"])
    finally:
        if ckpt is not None:
            ckpt.close()
        logger.close()
        close = getattr(train_iter, "close", None)
        if close:
            close()

    steps_done = diverged_step if diverged else step
    tokens = steps_done * B * T
    total_train_s = prior_train_s + train_s
    summary = {
        "run_dir": str(run_dir), "complete": True, "status": "diverged" if diverged else "ok",
        "n_params": n_non_embedding, "n_params_total": n_total,
        "tokens": tokens, "planned_tokens": planned_tokens(cfg),
        "steps": cfg.train.steps, "steps_completed": steps_done, "batch_size": B, "seq_len": T,
        "batch_tokens": B * T, "lr": cfg.optim.lr,
        "final_loss": _mean_last([r.get("loss") for r in records]),
        "eval_loss": None if diverged else eval_loss,
        "initial_loss": initial_loss, "diverged": diverged, "diverged_step": diverged_step,
        "wall_s": prior_wall + time.perf_counter() - t_start, "compile_s": compile_s,
        "flops": fpt * tokens, "flops_per_token": fpt,
        "tokens_per_s": tokens / total_train_s if total_train_s > 0 else None,
        "mfu": (tokens * fpt / total_train_s / peak) if total_train_s > 0 else None,
        "peak_flops": peak, "peak_flops_source": peak_source,
        "unigram_entropy": data.caches[0].unigram_entropy("heldout"),
        "vocab_size": model_cfg.vocab_size, "tokenizer": str(data.tokenizer_path),
        "schedule": cfg.optim.schedule, "warmup_steps": cfg.optim.warmup_steps,
        "weight_decay": cfg.optim.weight_decay, "seed": cfg.seed,
        "mesh": dict(mesh.shape), "devices": jax.device_count(), "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "hparams": cfg.hparams, **origin,
    }
    summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    if is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _initial_state(cfg: RunConfig, model_cfg: ModelConfig, rng, mesh, state_sh) -> State:
    if not cfg.model.init_from:
        return init_state_sharded(model_cfg, rng, mesh)
    from qwenjax.model_io import load_model

    loaded_cfg, params = load_model(cfg.model.init_from, shardings=state_sh["params"])
    want = _abstract_state(model_cfg)["params"]

    def shapes(tree):
        return [(jax.tree_util.keystr(p), x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)]

    if shapes(want) != shapes(params):
        raise UserError(f"model.init_from {cfg.model.init_from}: its parameters do not match the configured "
                        f"model (checkpoint hidden_size={loaded_cfg.hidden_size}, "
                        f"layers={loaded_cfg.num_hidden_layers}, vocab={loaded_cfg.vocab_size})")
    params = jax.tree.map(lambda x, w: x.astype(w.dtype), params, want)
    opt_state = jax.jit(optim.init_opt_state, out_shardings=state_sh["opt_state"])(params)
    step0 = jax.device_put(jnp.zeros((), jnp.int32), state_sh["step"])
    return {"params": params, "opt_state": opt_state, "step": step0}
