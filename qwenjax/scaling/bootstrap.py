"""Bootstrap intervals: one confidence level and one percentile rule for every coefficient and prediction."""

from __future__ import annotations

import numpy as np

CI_LEVEL = 0.95


def interval(draws: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the central CI_LEVEL percentile interval of bootstrap draws along `axis`."""
    tail = (1 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail], axis=axis)
    return lo, hi
