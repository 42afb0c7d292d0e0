"""A results table as (N, D) cells of configurations: each (lr, batch) point with its loss averaged over seeds.

Every estimator, regret and noise figure works on these seed-averaged configurations, so a sweep that reruns
its best points with more seeds sharpens the fit instead of counting one point several times. With one seed
per configuration the mean is the run's own loss, so single-seed results behave exactly as before.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CELL = ["n_params", "tokens"]
CONFIG = ["n_params", "tokens", "lr", "batch_tokens"]


def config_table(df: pd.DataFrame) -> pd.DataFrame:
    """Valid runs averaged per configuration: CONFIG columns, `loss` (mean over seeds), `seeds` (runs averaged).

    Runs of one configuration that share a seed (a rerun under a new run_id) are averaged first, so each
    seed counts once. Rows are sorted by cell, then lr, then batch.
    """
    valid = df[df["valid"]]
    if "seed" in valid.columns and valid["seed"].notna().any():
        seed = valid["seed"].astype(object).where(valid["seed"].notna(), "none")
        per_seed = valid.assign(_seed=seed.astype(str)).groupby([*CONFIG, "_seed"], sort=False)["loss"].mean()
        grouped = per_seed.groupby(level=list(range(len(CONFIG))), sort=True)
    else:
        grouped = valid.groupby(CONFIG, sort=True)["loss"]
    out = grouped.agg(["mean", "size"]).reset_index()
    return out.rename(columns={"mean": "loss", "size": "seeds"}).astype({c: float for c in CONFIG})


class Cells:
    """The configurations of a results table grouped by (N, D) cell, as flat arrays for vectorised work.

    `keys` is the sorted cell table; per configuration `cell` (index into keys), `log_lr`, `log_b`, `loss`
    (seed mean) and `seeds`; `best` is each cell's lowest mean loss.
    """

    def __init__(self, df: pd.DataFrame):
        self.configs = config_table(df)
        self.keys = self.configs[CELL].drop_duplicates().reset_index(drop=True)
        self.cell = self.configs[CELL].merge(self.keys.reset_index(), on=CELL)["index"].to_numpy()
        self.lr = self.configs["lr"].to_numpy(float)
        self.batch = self.configs["batch_tokens"].to_numpy(float)
        self.log_lr, self.log_b = np.log(self.lr), np.log(self.batch)
        self.loss = self.configs["loss"].to_numpy(float)
        self.seeds = self.configs["seeds"].to_numpy(float)
        self.best = np.full(len(self.keys), np.inf)
        np.minimum.at(self.best, self.cell, self.loss)
        bounds = np.searchsorted(self.cell, np.arange(len(self.keys) + 1))
        self.slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def __len__(self) -> int:
        return len(self.keys)

    def nearest(self, i: int, log_lr: float, log_b: float) -> int:
        """Index of cell i's configuration nearest to (log lr, log B): the one a prediction would run."""
        s = self.slices[i]
        dist = (self.log_lr[s] - log_lr) ** 2 + (self.log_b[s] - log_b) ** 2
        return s.start + int(np.argmin(dist))

    def best_config(self, i: int) -> int:
        """Index of cell i's configuration with the lowest mean loss (its optimum on the grid)."""
        s = self.slices[i]
        return s.start + int(np.argmin(self.loss[s]))

    def regret_row(self, i: int, log_lr: float, log_b: float) -> dict:
        """The prediction, the configuration nearest to it, and its loss over the cell's best, minus one."""
        j = self.nearest(i, log_lr, log_b)
        n, d = self.keys.iloc[i]
        return {
            "n_params": float(n),
            "tokens": float(d),
            "lr": float(np.exp(log_lr)),
            "batch_tokens": float(np.exp(log_b)),
            "nearest_lr": float(self.lr[j]),
            "nearest_batch_tokens": float(self.batch[j]),
            "regret": float(self.loss[j] / self.best[i] - 1),
        }
