"""Results files drawn from a known law, so the fitter can be tested (and demonstrated) against the truth.

The landscape follows what Step Law and DeepSeek LLM observe: at fixed (N, D) the loss is a convex, broad
bowl in (log lr, log B) tilted so that larger lr goes with larger batch; the optimum moves as a power law
in N and D; the floor follows a Chinchilla loss law. Too high a learning rate diverges.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenjax.scaling.prior import STEP_LAW, STEP_LAW_COEF


@dataclass(frozen=True)
class SyntheticLaw:
    """Ground truth: lr* = a N^alpha D^beta, B* = b N^gamma D^delta (tokens), L = E + A/N^α_L + B/D^β_L."""

    a: float = STEP_LAW_COEF["a"]
    alpha: float = STEP_LAW["alpha"]
    beta: float = STEP_LAW["beta"]
    b: float = STEP_LAW_COEF["b"]
    gamma: float = STEP_LAW["gamma"]
    delta: float = STEP_LAW["delta"]
    E: float = 1.82
    A: float = 482.01
    B: float = 2085.43
    loss_alpha: float = 0.3478
    loss_beta: float = 0.3658
    curvature_lr: float = 0.02  # relative loss increase per (ln lr)^2
    curvature_batch: float = 0.01
    curvature_cross: float = -0.01  # < 0: the valley runs along larger lr with larger batch
    lr_asymmetry: float = 1.0  # curvature above the optimal lr / below it (> 1: a steeper wall toward divergence)
    diverge_above: float = 3.0  # runs with lr > diverge_above * lr* diverge

    def lr_star(self, n, d):
        return self.a * np.power(n, self.alpha) * np.power(d, self.beta)

    def batch_star(self, n, d):
        return self.b * np.power(n, self.gamma) * np.power(d, self.delta)

    def floor(self, n, d):
        return self.E + self.A / np.power(n, self.loss_alpha) + self.B / np.power(d, self.loss_beta)

    def loss(self, n, d, lr, batch_tokens):
        u = np.log(lr / self.lr_star(n, d))
        v = np.log(batch_tokens / self.batch_star(n, d))
        curvature_lr = self.curvature_lr * np.where(u > 0, self.lr_asymmetry, 1.0)
        bowl = curvature_lr * u**2 + self.curvature_batch * v**2 + self.curvature_cross * u * v
        return self.floor(n, d) * (1 + bowl)


def synthetic_results(
    law: SyntheticLaw | None = None,
    n_values=(1e6, 2e6, 4e6, 8e6),
    d_values=(2.5e7, 5e7, 1e8, 2e8),
    lr_span: int = 4,
    batch_span: int = 2,
    seq_len: int = 256,
    noise: float = 3e-4,
    seed: int = 0,
    lr_per_octave: int = 2,
    seeds: int = 1,
) -> list[dict]:
    """Result records (the sweep's results.jsonl schema) for a full lr x batch grid in every (N, D) cell.

    The lr grid is the global grid 2^(k / lr_per_octave) (default 2^(k/2); 1 gives a coarse factor-2 grid),
    `lr_span` steps either side of each cell's optimum; batch sizes are powers of two in sequences,
    `batch_span` octaves either side.
    `noise` is the relative per-run noise (a seed's luck); `seeds` runs each configuration that many times
    (seeds `seed`, `seed` + 1, ...), each with its own noise.
    """
    law = law or SyntheticLaw()
    rng = np.random.default_rng(seed)
    rows = []
    for n in n_values:
        for d in d_values:
            k0 = round(lr_per_octave * math.log2(law.lr_star(n, d)))
            s0 = round(math.log2(law.batch_star(n, d) / seq_len))
            for k in range(k0 - lr_span, k0 + lr_span + 1):
                for s in range(max(0, s0 - batch_span), s0 + batch_span + 1):
                    lr, batch_size = 2.0 ** (k / lr_per_octave), 2**s
                    batch_tokens = batch_size * seq_len
                    diverged = bool(lr > law.diverge_above * law.lr_star(n, d))
                    for rep in range(seeds):
                        loss = (
                            None
                            if diverged
                            else float(law.loss(n, d, lr, batch_tokens) * (1 + noise * rng.normal()))
                        )
                        rows.append(
                            {
                                "run_id": f"n{n:.3g}-d{d:.3g}-lr{k}-bs{batch_size}"
                                + (f"-s{seed + rep}" if seeds > 1 else ""),
                                "name": f"synthetic-{n:.3g}",
                                "n_params": int(n),
                                "n_params_total": int(n) + 2_000_000,
                                "tokens": int(d),
                                "lr": lr,
                                "batch_size": batch_size,
                                "batch_tokens": batch_tokens,
                                "seq_len": seq_len,
                                "seed": seed + rep,
                                "final_loss": None if diverged else loss * 1.01,
                                "eval_loss": loss,
                                "diverged": diverged,
                                "status": "diverged" if diverged else "ok",
                                "flops": float(6 * n * d),
                                "wall_s": 1.0,
                            }
                        )
    return rows


def write_results(path: str | Path, rows: list[dict]) -> Path:
    """Write records as a results.jsonl file (one JSON object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
