"""The whole idea on one machine: corpus -> tokenizer -> sweep -> fit -> prediction -> main run -> report.

`run_demo(out)` sweeps small Qwen2.5-shaped models over learning rate x batch size at several (N, D),
fits the hyperparameter and loss laws (on the default corpus the exponents lean on the committed CPU ladder's
as a prior), predicts lr and batch for a model 4x larger trained on 3x more tokens, trains a grid of 0.5x /
1x / 2x the predicted lr and batch around it, every point with two seeds, and writes `out/report.md` with a
PASSED / MISSED verdict (the predicted point's mean loss over its seeds within 0.5% of the best grid point's,
each point judged on the same seeds, so a lucky or unlucky initialisation moves every point alike).
Every stage writes its result to disk before the next starts (token cache, results.jsonl, FIT.json, run
directories), so a rerun reuses what is done and finishes fast.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from qwenjax.config import ModelConfig, param_counts
from qwenjax.data import default_corpus_files, resolve_files
from qwenjax.data.prepare import prepare_data
from qwenjax.demo_report import CHECK_TOLERANCE, check_verdict, write_report
from qwenjax.errors import UserError
from qwenjax.hparams import predict_hparams
from qwenjax.jsonl import atomic_write_text
from qwenjax.run_config import load_config
from qwenjax.scaling import load_results, make_fit, make_plots, save_fit
from qwenjax.sweep.driver import SweepOptions, run_sweep
from qwenjax.sweep.spec import intermediate_for, kv_heads_for, load_spec

__all__ = ["CHECK_FACTORS", "CHECK_SEEDS", "CHECK_TOLERANCE", "PLANS", "DemoPlan", "check_grid", "check_verdict",
           "model_shape", "run_demo"]


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo. `full` fits a 2-core CPU in about 10 minutes; `mini` is the test's miniature.

    The swept models and the predicted one are Qwen2.5-shaped with `layers` layers and widths `widths` /
    `main_width` (the CPU ladder's regime, docs/sweeps.md); the main model is at least 3x the largest swept N
    and trains on `main_tokens_scale` x the largest swept D. Every run warms up over `warmup_tokens`: the
    exponents lean on the CPU ladder's, so the demo keeps the ladder's recipe (a shorter warmup lowers the best
    lr, measured at width 48: 5.5e-3 with 62k tokens of warmup against the ladder's 7.8e-3 with 125k).
    """

    widths: tuple[int, ...]  # hidden sizes of the swept models (the N axis)
    tokens: tuple[float, ...]  # training tokens per run (D axis)
    lr: tuple[float, ...]
    batch_size: tuple[int, ...]
    seq_len: int
    main_width: int  # hidden size of the predicted model
    main_tokens_scale: float  # its D over the largest swept D
    layers: int
    vocab_size: int
    head_dim: int
    max_bytes: int | None  # corpus bytes read (None: all)
    eval_sequences: int
    noise_seeds: tuple[int, ...]  # seeds rerun at each swept cell's optimum: the noise floor
    max_extensions: int
    warmup_tokens: float  # linear warmup of every run, sweep and check alike


PLANS = {
    "full": DemoPlan(widths=(32, 48), tokens=(2.5e5, 5.0e5),
                     lr=tuple(2.0 ** (k / 2) for k in range(-16, -9)), batch_size=(4, 8, 16),  # 3.9e-3 .. 3.1e-2
                     seq_len=128, main_width=96, main_tokens_scale=3.0, layers=1, vocab_size=1024, head_dim=16,
                     max_bytes=20_000_000, eval_sequences=512, noise_seeds=(1, 2), max_extensions=3,
                     warmup_tokens=1.25e5),  # the CPU ladder's (a quarter of its 0.5M budget): its prior's recipe
    "mini": DemoPlan(widths=(16, 24, 32), tokens=(8.0e3, 1.6e4), lr=(1.6e-2, 6.4e-2, 0.25), batch_size=(4, 8),
                     seq_len=32, main_width=64, main_tokens_scale=3.0, layers=1, vocab_size=400, head_dim=8,
                     max_bytes=300_000, eval_sequences=16, noise_seeds=(1,), max_extensions=0, warmup_tokens=2e3),
}
#: the check grid around the prediction: lr and batch times each of these factors
CHECK_FACTORS = (0.5, 1.0, 2.0)
CHECK_SEEDS = (0, 1)


def _say(stage: int, text: str) -> None:
    print(f"[{stage}/7] {text}", file=sys.stderr, flush=True)


def _base_config(out: Path, data: str | None, plan: DemoPlan) -> dict[str, Any]:
    """The run config every demo run starts from (the sweep sets model, steps, batch and lr): the CPU ladder's
    regime -- WSD with a cooldown to zero, a fixed held-out set whatever the batch size."""
    return {
        "model": {"max_position_embeddings": max(256, plan.seq_len), "rope_theta": 10000.0,
                  "tie_word_embeddings": True, "dtype": "float32"},
        "train": {"seq_len": plan.seq_len, "log_every": 50, "divergence_factor": 2.0},
        "optim": {"schedule": "wsd", "decay_fraction": 0.2, "warmup_steps": 0, "min_lr_ratio": 0.0,
                  "weight_decay": 0.1},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "checkpoint": {"every_steps": 0, "keep": 1},
        "data": {"path": str(Path(data).resolve()) if data else None, "vocab_size": plan.vocab_size,
                 "cache_dir": str(out / "cache"), "heldout_fraction": 0.05, "max_bytes": plan.max_bytes},
        "eval": {"every_steps": 0, "sequences": plan.eval_sequences},
    }


def _write_yaml(path: Path, tree: dict) -> Path:
    atomic_write_text(path, yaml.safe_dump(tree, sort_keys=False))
    return path


def _corpus_and_tokenizer(out: Path, data: str | None, plan: DemoPlan) -> dict[str, Any]:
    """Stages 1-2: resolve the corpus, train the tokenizer and build the token cache (each once)."""
    files = resolve_files(data) if data else default_corpus_files(plan.max_bytes)
    size = sum(f.stat().st_size for f in files)
    _say(1, f"corpus: {len(files)} files, {size / 1e6:.1f} MB ({data or 'the Python standard library'})")
    base = _write_yaml(out / "base.yaml", _base_config(out, data, plan))
    t0 = time.perf_counter()
    setup = prepare_data(load_config(base))
    cache = setup.caches[0]
    info = {"files": len(files), "bytes": size, "tokenizer": str(setup.tokenizer_path),
            "vocab_size": setup.vocab_size, "train_tokens": int(len(cache.train_tokens)),
            "heldout_tokens": int(len(cache.heldout_tokens)), "unigram_entropy": cache.unigram_entropy("heldout")}
    _say(2, f"tokenizer: {setup.vocab_size} tokens; token cache: {info['train_tokens']:,} train / "
            f"{info['heldout_tokens']:,} held-out tokens ({time.perf_counter() - t0:.1f} s)")
    if info["heldout_tokens"] < plan.eval_sequences * (plan.seq_len + 1):
        raise UserError(f"the corpus is too small for the demo: {info['heldout_tokens']} held-out tokens "
                        f"(give --data a larger corpus)")
    return info


def _sweep(out: Path, spec: dict, name: str, workers: int) -> tuple[Path, dict]:
    spec_path = _write_yaml(out / f"{name}.yaml", spec)
    summary = run_sweep(load_spec(spec_path), out / name, SweepOptions(workers=workers, live=False))
    return out / name / "results.jsonl", summary


#: the CPU ladder's committed results (in a source checkout): the demo's prior for the exponents
LADDER_RESULTS = Path(__file__).resolve().parents[1] / "sweeps" / "results" / "cpu-ladder.jsonl"


def _ladder_prior(out: Path) -> Path | None:
    """Fit the committed CPU ladder once (OUT/ladder-FIT.json) for the prior; None outside a source checkout."""
    path = out / "ladder-FIT.json"
    if not path.is_file():
        if not LADDER_RESULTS.is_file():
            return None
        save_fit(make_fit(load_results(LADDER_RESULTS), bootstrap=200, seed=0, loss_law=False), path)
    return path


def model_shape(width: int, plan: DemoPlan) -> dict:
    """The Qwen2.5-shaped model of one width: `plan.layers` layers, heads of `plan.head_dim`, Qwen2.5's key/value
    head count and MLP ratio."""
    heads = width // plan.head_dim
    kv = kv_heads_for(heads)
    if width % plan.head_dim or kv is None:
        raise UserError(f"width {width} does not split into Qwen2.5-style heads of {plan.head_dim}")
    return {"hidden_size": width, "intermediate_size": intermediate_for(width), "num_hidden_layers": plan.layers,
            "num_attention_heads": heads, "num_key_value_heads": kv}


def check_grid(prediction: dict, seq_len: int) -> tuple[list[float], list[int]]:
    """The learning rates and batch sizes (sequences) of the check: the prediction times 0.5, 1 and 2."""
    lrs = [float(f"{prediction['lr'] * f:.6g}") for f in CHECK_FACTORS]
    batch = int(prediction["batch_size"])
    batches = sorted({max(1, round(batch * f)) for f in CHECK_FACTORS})
    return lrs, batches


def run_demo(out: str | Path = "runs/demo", data: str | None = None, *, plan: str | DemoPlan = "full",
             workers: int = 1) -> dict[str, Any]:
    """Run (or resume) the whole demo into `out`; returns what the report shows."""
    plan = PLANS[plan] if isinstance(plan, str) else plan
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    corpus = _corpus_and_tokenizer(out, data, plan)
    n_of = lambda width: param_counts(ModelConfig(vocab_size=corpus["vocab_size"], tie_word_embeddings=True,
                                                  **model_shape(width, plan)))[1]

    # 3. The sweep: lr x batch at every (N, D); shorter budgets fork their cooldown from the longest run;
    #    each cell's optimum is rerun with more seeds for the noise floor.
    sweep_spec = {
        "name": "demo-sweep", "base": str(out / "base.yaml"),
        "models": [model_shape(w, plan) for w in plan.widths],
        "tokens": list(plan.tokens), "lr": list(plan.lr), "batch_size": list(plan.batch_size),
        "max_extensions": plan.max_extensions, "bracket_margin": 0.01, "fork_cooldowns": True,
        "warmup_fraction": plan.warmup_tokens / min(plan.tokens),
        "noise_seeds": list(plan.noise_seeds),
    }
    _say(3, f"sweep: {len(plan.widths)} model sizes x {len(plan.tokens)} token budgets x {len(plan.lr)} "
            f"learning rates x {len(plan.batch_size)} batch sizes, + {len(plan.noise_seeds)} seeds at each optimum")
    results_path, sweep_summary = _sweep(out, sweep_spec, "sweep", workers)

    # 4. Fit the laws; on the default corpus, the exponents lean on the committed CPU ladder's (a prior), since
    #    two model sizes and two budgets are a short lever arm for a 4x extrapolation.
    df = load_results([results_path])
    fit_path = out / "FIT.json"
    prior = _ladder_prior(out) if data is None else None
    fit = make_fit(df, bootstrap=200, seed=0, **({"method": "prior", "prior": str(prior)} if prior else {}))
    save_fit(fit, fit_path)
    plots = [str(p) for p in make_plots(df, fit, out / "plots")]
    regret, noise = fit["regret"], (fit.get("noise") or {}).get("relative")
    _say(4, f"fit: {fit['data']['cells']} cells, {fit['data']['runs_valid']} runs; leave-one-cell-out regret "
            f"mean {regret['mean']:.2%} (noise floor {noise:.2%})" if regret["mean"] is not None and noise is not None
            else "fit: done")

    # 5. Predict for a larger model trained on more tokens.
    shape = model_shape(plan.main_width, plan)
    n_main = n_of(plan.main_width)
    d_main = max(plan.tokens) * plan.main_tokens_scale
    prediction = predict_hparams(fit_path, n_main, d_main, seq_len=plan.seq_len)
    lrs, batches = check_grid(prediction, plan.seq_len)
    _say(5, f"predict: N = {n_main:,} non-embedding params ({n_main / n_of(max(plan.widths)):.1f}x the largest "
            f"swept), D = {d_main:,.0f} tokens -> lr {prediction['lr']:.3g}, batch {prediction['batch_size']} "
            f"sequences ({prediction['batch_tokens']:,.0f} tokens)")

    # 6. The check: a grid of lr x {0.5, 1, 2} and batch x {0.5, 1, 2} around the prediction, then the whole grid
    #    again with a second seed: points are compared on their mean over the same seeds.
    main_spec = {
        "name": "demo-main", "base": str(out / "base.yaml"), "models": [shape], "tokens": [d_main],
        "lr": lrs, "batch_size": batches, "max_extensions": 0,
        # the sweep's warmup, in tokens
        "warmup_fraction": plan.warmup_tokens / d_main,
    }
    _say(6, f"check: lr {', '.join(f'{x:.3g}' for x in lrs)} x batch {', '.join(map(str, batches))}, each with "
            f"seeds {', '.join(map(str, CHECK_SEEDS))}")
    main_results, main_summary = _sweep(out, main_spec, "main", workers)
    seed_spec = {**main_spec, "name": "demo-main-seeds", "seeds": [s for s in CHECK_SEEDS if s != 0]}
    seed_results, _ = _sweep(out, seed_spec, "main-seeds", workers)

    report = write_report(out, corpus=corpus, plan=plan, fit=fit, prediction=prediction, n_main=n_main,
                          d_main=d_main, main_shape=shape, sweep_results=results_path,
                          main_results=[main_results, seed_results], sweep_summary=sweep_summary, plots=plots,
                          wall_s=time.perf_counter() - t_start)
    _say(7, f"report: {report['path']}")
    return report
