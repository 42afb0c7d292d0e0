"""The whole idea on one machine: corpus -> tokenizer -> sweep -> fit -> prediction -> main run -> report.

`run_demo(out)` sweeps small Qwen2.5-shaped models over learning rate x batch size at several (N, D),
fits the hyperparameter and loss laws, predicts lr and batch for a model about 3x larger trained on about
3x more tokens, trains it with the prediction and with 2x / 0.5x the predicted learning rate, and writes
`out/report.md`. Every stage writes its result to disk before the next starts (token cache, results.jsonl,
FIT.json, run directories), so a rerun reuses what is done and finishes fast.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from qwenjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo. `full` fits a 2-core CPU in about 15 minutes; `mini` is the test's miniature."""

    sizes: tuple[float, ...]  # target non-embedding parameters of the swept models
    tokens: tuple[float, ...]  # training tokens per run (D axis)
    lr: tuple[float, ...]
    batch_size: tuple[int, ...]
    seq_len: int
    main_scale: float  # the predicted model is this much larger in N and in D than the largest swept
    vocab_size: int
    head_dim: int
    max_bytes: int | None  # corpus bytes read (None: all)
    eval_batches: int


PLANS = {
    "full": DemoPlan(sizes=(2.0e4, 5.0e4, 1.2e5), tokens=(1.25e5, 2.5e5), lr=(2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),
                     batch_size=(8, 16), seq_len=128, main_scale=3.0, vocab_size=2048, head_dim=16,
                     max_bytes=None, eval_batches=16),
    "mini": DemoPlan(sizes=(2.0e4, 6.0e4), tokens=(8.0e3, 1.6e4), lr=(1.6e-2, 6.4e-2, 0.25), batch_size=(4, 8),
                     seq_len=32, main_scale=2.0, vocab_size=400, head_dim=8, max_bytes=300_000, eval_batches=2),
}


def _say(stage: int, text: str) -> None:
    print(f"[{stage}/7] {text}", file=sys.stderr, flush=True)


def _base_config(out: Path, data: str | None, plan: DemoPlan) -> dict[str, Any]:
    """The run config every demo run starts from (the sweep sets model, steps, batch and lr)."""
    return {
        "model": {"max_position_embeddings": max(256, plan.seq_len), "rope_theta": 10000.0,
                  "tie_word_embeddings": True, "dtype": "float32"},
        "train": {"seq_len": plan.seq_len, "log_every": 10, "divergence_factor": 2.0},
        "optim": {"schedule": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.1, "weight_decay": 0.1},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "checkpoint": {"every_steps": 0, "keep": 1},
        "data": {"path": str(Path(data).resolve()) if data else None, "vocab_size": plan.vocab_size,
                 "cache_dir": str(out / "cache"), "heldout_fraction": 0.02, "max_bytes": plan.max_bytes},
        "eval": {"every_steps": 0, "batches": plan.eval_batches},
    }


def _write_yaml(path: Path, tree: dict) -> Path:
    from qwenjax.run_config import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(tree, sort_keys=False))
    return path


def _corpus_and_tokenizer(out: Path, data: str | None, plan: DemoPlan) -> dict[str, Any]:
    """Stages 1-2: resolve the corpus, train the tokenizer and build the token cache (each once)."""
    from qwenjax.data import default_corpus_files, resolve_files
    from qwenjax.run_config import load_config
    from qwenjax.train import prepare_data

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
    if info["heldout_tokens"] < plan.eval_batches * plan.batch_size[0] * (plan.seq_len + 1):
        raise UserError(f"the corpus is too small for the demo: {info['heldout_tokens']} held-out tokens "
                        f"(give --data a larger corpus)")
    return info


def _sweep(out: Path, spec: dict, name: str, workers: int) -> tuple[Path, dict]:
    from qwenjax.sweep import SweepOptions, run_sweep
    from qwenjax.sweep.spec import load_spec

    spec_path = _write_yaml(out / f"{name}.yaml", spec)
    summary = run_sweep(load_spec(spec_path), out / name, SweepOptions(workers=workers, live=False))
    return out / name / "results.jsonl", summary


def _main_model(plan: DemoPlan) -> dict:
    from qwenjax.sweep.spec import ladder_shape

    return ladder_shape(max(plan.sizes) * plan.main_scale, plan.head_dim)


def run_demo(out: str | Path = "runs/demo", data: str | None = None, *, plan: str | DemoPlan = "full",
             workers: int = 1) -> dict[str, Any]:
    """Run (or resume) the whole demo into `out`; returns what the report shows."""
    from qwenjax.scaling import load_fit, load_results, make_fit, make_plots, predict, save_fit

    plan = PLANS[plan] if isinstance(plan, str) else plan
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    corpus = _corpus_and_tokenizer(out, data, plan)

    # 3. The sweep: lr x batch at every (N, D); learning rates that differ only in lr train as populations.
    sweep_spec = {
        "name": "demo-sweep", "base": str(out / "base.yaml"),
        "ladder": {"sizes": list(plan.sizes), "head_dim": plan.head_dim},
        "tokens": list(plan.tokens), "lr": list(plan.lr), "batch_size": list(plan.batch_size),
        "population": "lr", "max_extensions": 0,
    }
    _say(3, f"sweep: {len(plan.sizes)} model sizes x {len(plan.tokens)} token budgets x {len(plan.lr)} "
            f"learning rates x {len(plan.batch_size)} batch sizes")
    results_path, sweep_summary = _sweep(out, sweep_spec, "sweep", workers)

    # 4. Fit the laws.
    df = load_results([results_path])
    fit_path = out / "FIT.json"
    fit = make_fit(df, bootstrap=200, seed=0)
    save_fit(fit, fit_path)
    plots = [str(p) for p in make_plots(df, fit, out / "plots")]
    _say(4, f"fit: {fit['data']['cells']} cells, {fit['data']['runs_valid']} runs; leave-one-cell-out regret "
            f"mean {fit['regret']['mean']:.2%}" if fit["regret"]["mean"] is not None else "fit: done")

    # 5. Predict for a larger model trained on more tokens.
    from qwenjax.config import ModelConfig
    from qwenjax.model import count_params

    shape = _main_model(plan)
    main_cfg = ModelConfig(vocab_size=corpus["vocab_size"], tie_word_embeddings=True, **shape)
    n_main = count_params(main_cfg)[1]
    d_main = max(plan.tokens) * plan.main_scale
    prediction = predict(load_fit(fit_path), n_main, d_main, seq_len=plan.seq_len)
    batch = int(prediction["batch_size"])
    _say(5, f"predict: N = {n_main:,} non-embedding params, D = {d_main:,.0f} tokens -> lr {prediction['lr']:.3g}, "
            f"batch {batch} sequences ({prediction['batch_tokens']:,.0f} tokens)")

    # 6. Main run with the prediction, and 2x / 0.5x the learning rate at the same batch.
    lrs = [prediction["lr"] * f for f in (0.5, 1.0, 2.0)]
    main_spec = {
        "name": "demo-main", "base": str(out / "base.yaml"), "models": [shape], "tokens": [d_main],
        "lr": lrs, "batch_size": [batch], "population": "lr", "max_extensions": 0,
        "overrides": {"eval.batches": plan.eval_batches * 2},
    }
    _say(6, f"main run: lr {', '.join(f'{x:.3g}' for x in lrs)} at batch {batch}")
    main_results, main_summary = _sweep(out, main_spec, "main", workers)

    from qwenjax.demo_report import write_report

    report = write_report(out, corpus=corpus, plan=plan, fit=fit, prediction=prediction, n_main=n_main,
                          d_main=d_main, main_shape=shape, sweep_results=results_path, main_results=main_results,
                          sweep_summary=sweep_summary, plots=plots, wall_s=time.perf_counter() - t_start)
    _say(7, f"report: {report['path']}")
    return report


def check_verdict(losses: dict[float, float], predicted_lr: float) -> tuple[bool, str]:
    """Is the predicted lr's loss within 1% of the better of its 2x / 0.5x neighbours, or better than both?"""
    ours = losses[predicted_lr]
    others = [v for k, v in losses.items() if k != predicted_lr and math.isfinite(v)]
    best_other = min(others) if others else math.inf
    ok = ours <= best_other * 1.01
    if ours <= best_other:
        text = f"the predicted learning rate is the best of the three (loss {ours:.4f} vs {best_other:.4f})"
    elif ok:
        text = (f"the predicted learning rate is within {ours / best_other - 1:.2%} of the better neighbour "
                f"(loss {ours:.4f} vs {best_other:.4f}; tolerance 1%)")
    else:
        text = (f"the prediction MISSED: its loss {ours:.4f} is {ours / best_other - 1:.2%} above the better "
                f"neighbour's {best_other:.4f} (tolerance 1%)")
    return ok, text
