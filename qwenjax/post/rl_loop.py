"""`qwenjax rl`: GRPO rounds (docs/post-training.md, "GRPO"). Each of `train.steps` rounds:

1. takes `rl.prompts_per_step` prompts in curriculum order (below);
2. samples `rl.group_size` answers to each in one batched KV-cache decode (qwenjax.post.rollout), from the
   train state's own params (no copy, no reload), recording each token's log-prob as sampled (old_logp);
3. scores them with the verifier (qwenjax.post.rl_verify) and normalises rewards within each group
   (qwenjax.post.grpo.group_advantages);
4. runs the frozen reference (the starting params) over the round once (ref_logp) and takes one optimizer
   step of the GRPO objective through the trainer's own compiled step (qwenjax.train.step).

Curriculum (prompts with higher reward variance first): the first epoch visits the prompts in file order;
every later epoch visits them sorted by the reward variance measured the last time each was sampled,
largest first (ties: file order). An epoch is one pass over the prompts, prompts_per_step at a time.

Writes `config.yaml`, `metrics.jsonl` (one record per round, also a console line), `ckpt/<round>/` every
`checkpoint.every_steps` rounds (the train state and, as JSON, the curriculum's position and variances), then
`model/` and `summary.json` in `run_dir`. Rerunning the command on a run dir with a finished run returns its
summary; on an unfinished one it resumes from the newest checkpoint (the rounds after it are redone, and, as
each round's sampling key is a function of the seed and the round, come out as they would have without the
stop), or starts over when there is none. SIGTERM/SIGINT stop the run after the current round with a
checkpoint there, as `qwenjax train` does.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.data.chat import encode_chat, special_ids
from qwenjax.data.tokenizer import load_tokenizer
from qwenjax.errors import UserError
from qwenjax.jsonl import append, atomic_write_text
from qwenjax.post.grpo import GRPO, group_advantages, reference_logps
from qwenjax.post.pairs import read_prompts
from qwenjax.post.rl_verify import check_prompts, make_verifier
from qwenjax.post.rollout import sample_group
from qwenjax.run_config import MISSING, RunConfig, model_config, save_config
from qwenjax.train import sharding
from qwenjax.train.checkpoint import Checkpointer, abstract_with_shardings
from qwenjax.train.interrupt import interrupted, run_dir_lock, steps, stop_check
from qwenjax.train.metrics import truncate_metrics
from qwenjax.train.run_dir import check_same_run, model_dir_of, write_model
from qwenjax.train.setup import resolve_dtype
from qwenjax.train.start import initial_state
from qwenjax.train.step import abstract_state, compiled_train_step, make_hparams, make_step_static

log = logging.getLogger(__name__)


def curriculum_order(n: int, variance: dict[int, float]) -> list[int]:
    """The next epoch's prompt order: by last measured reward variance, largest first; unmeasured prompts
    first, ties in file order."""
    return sorted(range(n), key=lambda i: (-variance.get(i, math.inf), i))


def format_record(r: dict[str, Any]) -> str:
    """The console line of a round (metrics.jsonl holds every field)."""
    acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    return (f"step {r['step']} | reward {r['reward_mean']:.3f} (std {r['reward_std']:.3f}) | accuracy {acc} | "
            f"kl {r['kl']:.2e} | clip {r['clip_fraction']:.3f} | len {r['response_len']:.1f} | "
            f"loss {r['loss']:.4f} | grad_norm {r['grad_norm']:.3f} | {r['step_s']:.1f} s")


def tokenizer_path(cfg: RunConfig) -> Path:
    if cfg.data.tokenizer and cfg.data.tokenizer != MISSING:
        return Path(cfg.data.tokenizer).expanduser()
    if cfg.model.init_from:
        source = Path(cfg.model.init_from).expanduser()
        return model_dir_of(source) if model_dir_of(source).is_dir() else source
    raise UserError("qwenjax rl needs a tokenizer: data.tokenizer, or model.init_from with one beside the model")


def rollout_batch(rows: list[tuple[list[int], list[int], list[float], float]], T: int) -> dict[str, np.ndarray]:
    """The GRPO batch (qwenjax.post.grpo.GRPO_BATCH, without ref_logp) from (prompt ids, answer ids, answer
    log-probs, advantage) per sequence: inputs = ids[:-1], targets = ids[1:], mask on the answer's targets."""
    B = len(rows)
    out = {k: np.zeros((B, T), dt) for k, dt in (("inputs", np.int32), ("targets", np.int32), ("mask", np.float32),
                                                  ("old_logp", np.float32), ("advantage", np.float32))}
    for i, (prompt, answer, logps, adv) in enumerate(rows):
        ids = list(prompt) + list(answer)
        L = len(ids) - 1
        out["inputs"][i, :L] = ids[:-1]
        out["targets"][i, :L] = ids[1:]
        start = len(prompt) - 1  # input position whose target is the answer's first token
        out["mask"][i, start:L] = 1.0
        out["old_logp"][i, start:L] = logps
        out["advantage"][i, :] = adv
    return out


def run_rl(cfg: RunConfig) -> dict[str, Any]:
    rl = cfg.rl
    if jax.process_count() > 1:
        raise UserError("qwenjax rl runs in one process (each would sample the whole round); use one host")
    if cfg.train.objective == "reward":
        raise UserError("qwenjax rl trains a language model: train.objective reward makes a reward model; "
                        "name the reward model in rl.reward_model instead")
    if not rl.prompts or rl.prompts == MISSING:
        raise UserError("rl.prompts is not set: a JSONL file of prompts with \"answer\" or \"tests\"")
    prompts = list(read_prompts(rl.prompts))
    if not prompts:
        raise UserError(f"rl.prompts {rl.prompts} holds no prompts")
    check_prompts(rl.verifier, prompts)
    cfg = resolve_dtype(cfg)  # model.dtype auto -> this platform's, as the saved config has it
    run_dir = Path(cfg.run_dir).expanduser()
    is_main = jax.process_index() == 0
    with run_dir_lock(run_dir, is_main), stop_check() as should_stop:
        same = check_same_run(run_dir, cfg)  # another experiment in run_dir: one error line
        if (run_dir / "summary.json").is_file():
            if not same:
                raise UserError(f"{run_dir} holds a finished rl run with other settings; use another run_dir "
                                "(or delete that one)")
            return json.loads((run_dir / "summary.json").read_text())
        return _rounds(cfg, prompts, run_dir, should_stop)


def _rounds(cfg: RunConfig, prompts: list, run_dir: Path, should_stop) -> dict[str, Any]:
    rl, is_main = cfg.rl, jax.process_index() == 0
    tok_path = tokenizer_path(cfg)
    tok = load_tokenizer(tok_path)
    im_end = special_ids(tok)["<|im_end|>"]
    ids = [encode_chat(tok, rec["messages"], add_generation_prompt=True)[0].tolist() for _, rec in prompts]
    T, G, P = cfg.train.seq_len, rl.group_size, rl.prompts_per_step
    longest = max(map(len, ids))
    if longest + rl.max_new_tokens > T + 1:
        raise UserError(f"the longest prompt ({longest} tokens) + rl.max_new_tokens ({rl.max_new_tokens}) must "
                        f"fit in train.seq_len + 1 = {T + 1}")
    mesh = sharding.mesh_from_config(cfg.mesh)
    B, k, dp = P * G, cfg.train.grad_accum, sharding.data_parallel_size(mesh)
    if B % (k * dp):
        raise UserError(f"rl.prompts_per_step x rl.group_size = {B} sequences is not divisible by train.grad_accum "
                        f"({k}) x the data-parallel size ({dp})")
    model_cfg = model_config(cfg, vocab_size=tok.vocab_size)
    verify = make_verifier(rl, tok.vocab_size)
    abstract = abstract_state(model_cfg)
    state_sh = sharding.state_shardings(abstract, mesh, model_cfg)
    state = initial_state(cfg, model_cfg, jax.random.key(cfg.seed), mesh, state_sh)
    ref_params = jax.tree.map(jnp.copy, state["params"])  # frozen: the state's buffers are donated each step
    ckpt = Checkpointer(run_dir / "ckpt", keep=cfg.checkpoint.keep) if cfg.checkpoint.enabled else None
    restored = (ckpt.restore(abstract_with_shardings(abstract, state_sh)) if ckpt is not None and ckpt.all_steps()
                else None)
    start, meta = 0, {}
    if restored is not None:
        start, state, meta = restored
        log.info("resuming %s from round %d", run_dir, start)
    elif (run_dir / "metrics.jsonl").exists():
        log.warning("%s holds an unfinished rl run without a checkpoint: starting it over", run_dir)
    step_fn, compile_s = compiled_train_step(model_cfg, make_step_static(cfg, GRPO), mesh, B, T)
    hp = make_hparams(cfg, GRPO)
    ref_fn = reference_logps(model_cfg, cfg.attention.kernel)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    records = truncate_metrics(run_dir / "metrics.jsonl", start) if is_main else []
    if is_main:
        log.info("rl: %d prompts, %d x %d answers per step, step compiled in %.1f s", len(prompts), P, G, compile_s)
    t_start, prior_wall = time.perf_counter(), float(meta.get("wall_s", 0.0))
    order, cursor = meta.get("order", list(range(len(prompts)))), int(meta.get("cursor", 0))
    variance = {int(i): float(v) for i, v in meta.get("variance", [])}
    base_key = jax.random.key(cfg.seed + 1)
    status, step, saved_at = "complete", start, start if restored is not None else None

    def save() -> None:
        nonlocal saved_at
        ckpt.save(step, state, {"step": step, "order": order, "cursor": cursor, "variance": sorted(variance.items()),
                                "wall_s": prior_wall + time.perf_counter() - t_start})
        saved_at = step

    try:
        with steps():  # a signal waits for the end of the round
            while step < cfg.train.steps:
                step += 1
                t0 = time.perf_counter()
                chosen = []
                while len(chosen) < P:
                    if cursor == len(order):
                        order, cursor = curriculum_order(len(prompts), variance), 0
                    chosen.append(order[cursor])
                    cursor += 1
                rows, rewards_PG, correct, lengths = [], [], [], []
                for j, i in enumerate(chosen):
                    samples = sample_group(model_cfg, state["params"], ids[i], G, max_new_tokens=rl.max_new_tokens,
                                           temperature=rl.temperature, top_p=rl.top_p, eos_id=im_end,
                                           rng=jax.random.fold_in(jax.random.fold_in(base_key, step), j))
                    texts = [tok.decode([t for t in a if t != im_end and t < tok.vocab_size]) for a, _ in samples]
                    r, ok = verify(prompts[i][1], texts, [(ids[i], a) for a, _ in samples])
                    variance[i] = float(np.var(r))
                    rewards_PG.append(r)
                    correct += [o for o in ok if o is not None]
                    lengths += [len(a) for a, _ in samples]
                    rows += [(ids[i], a, lp) for a, lp in samples]
                sample_s = time.perf_counter() - t0
                adv_B = group_advantages(rewards_PG).reshape(-1)
                batch = rollout_batch([(*row, float(a)) for row, a in zip(rows, adv_B, strict=True)], T)
                batch["ref_logp"] = np.asarray(ref_fn(ref_params, jnp.asarray(batch["inputs"]),
                                                      jnp.asarray(batch["targets"])))
                batch = sharding.global_batch({k: batch[k] for k in GRPO.batch_keys}, mesh, B)
                state, metrics = step_fn(state, batch, hp)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                r_all = np.asarray(rewards_PG, np.float64)
                record = {"step": step, **metrics, "reward_mean": float(r_all.mean()),
                          "reward_std": float(r_all.std()), "accuracy": float(np.mean(correct)) if correct else None,
                          "response_len": float(np.mean(lengths)),
                          "zero_std_groups": float(np.mean(r_all.std(axis=1) == 0)),
                          "sample_s": sample_s, "step_s": time.perf_counter() - t0}
                records.append(record)
                if is_main:
                    append(run_dir / "metrics.jsonl", record)
                    log.info("%s", format_record(record))
                if not math.isfinite(metrics["loss"]):
                    status = "diverged"
                    break
                every = cfg.checkpoint.every_steps
                if ckpt is not None and every and step % every == 0 and step < cfg.train.steps:
                    save()
                signum = should_stop(step)
                if signum is not None and step < cfg.train.steps:
                    if ckpt is not None and saved_at != step:
                        save()
                    if ckpt is not None:
                        ckpt.wait()
                    raise interrupted(signum, step, run_dir / "ckpt" / str(step) if saved_at == step else None)
    finally:
        if ckpt is not None:
            ckpt.close()
    write_model(model_dir_of(run_dir), model_cfg, state["params"], tok_path)
    summary = {"status": status, "steps_completed": len(records), "prompts": len(prompts),
               "group_size": G, "final_reward_mean": records[-1]["reward_mean"] if records else None,
               "final_accuracy": records[-1]["accuracy"] if records else None,
               "wall_s": prior_wall + time.perf_counter() - t_start}
    if is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
