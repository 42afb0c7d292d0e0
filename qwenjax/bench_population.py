"""Population throughput: `members` runs that differ only in lr, trained together vs one after another.

The step-level comparison is the sweep's probe (`qwenjax.sweep.population.measure`) with a solo side of
`members` sequential runs; `whole_runs` adds whole runs on real data (`train` x members vs one
`train_population`), which include what a sweep pays per run beyond the step (data pipeline, eval,
checkpoints, logging). `qwenjax sweep --bench-population` writes the result.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from qwenjax.config import param_counts
from qwenjax.run_config import model_config
from qwenjax.sweep.plan import replace_dotted
from qwenjax.sweep.population import STRATEGIES, measure
from qwenjax.train import train, train_population


def whole_runs(cfgs: list, *, strategy: str, steps: int, workdir: str | os.PathLike | None) -> dict:
    """Whole runs on real data: `train` for each member one after another vs one `train_population`.
    Compile time is excluded from both sides (each side's first compile is reported separately)."""
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
    reported separately and excluded from the ratio. With `end_to_end`, also whole runs on real data with
    the best strategy (`whole_runs`).
    """
    cfgs = [replace_dotted(run_cfg, {"optim.lr": run_cfg.optim.lr * lr_spread ** (j - members // 2)})
            for j in range(members)]
    mc = model_config(run_cfg)
    m = measure(cfgs, steps=steps, strategies=strategies, model_cfg=mc, solo_runs=True, rounds=rounds)
    total, non_embedding = param_counts(mc)
    best = max(m["strategies"], key=lambda s: m["strategies"][s]["ratio"])
    if end_to_end:
        m["end_to_end"] = whole_runs(cfgs, strategy=best, steps=end_to_end_steps, workdir=workdir)
    m.update(n_params=non_embedding, n_params_total=total, batch_size=run_cfg.train.batch_size,
             seq_len=run_cfg.train.seq_len, hidden_size=mc.hidden_size,
             num_hidden_layers=mc.num_hidden_layers, vocab_size=mc.vocab_size, backend=jax.default_backend(),
             best=best)
    return m
