"""Human-readable counts ("494M", "18T") for parameters and tokens, parsed in one place, and the one
conversion of a batch in tokens to sequences.

Suffixes are decimal (k = 1e3, M = 1e6, B or G = 1e9, T = 1e12), as model and token counts are quoted.
"""

from __future__ import annotations

import math
import re

from qwenjax.errors import UserError

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_COUNT = re.compile(
    r"^\s*([0-9][0-9_]*(?:\.[0-9_]*)?(?:e[+-]?[0-9]+)?|\.[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$",
    re.IGNORECASE,
)


def parse_count(value: str | float | int, what: str = "count") -> float:
    """'494M' -> 4.94e8, '18T' -> 1.8e13, '1.5e9' -> 1.5e9; plain numbers pass through.

    Raises UserError (naming `what`) on anything unparsable, non-finite or not positive.
    """
    if isinstance(value, bool):
        raise UserError(f"{what} must be a number like 494M, 18T or 1.5e9, got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = str(value).strip()
        if text.startswith("-"):
            raise UserError(f"{what} must be positive, got {value!r}")
        match = _COUNT.match(text)
        if not match:
            raise UserError(
                f"{what} must be a number like 494M, 18T or 1.5e9 (suffixes k, M, B, T), got {value!r}"
            )
        number = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if not math.isfinite(number) or number <= 0:
        raise UserError(f"{what} must be positive and finite, got {value!r}")
    return number


def format_count(value: float) -> str:
    """The inverse, for messages: 4.94e8 -> '494M'."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def batch_sequences(batch_tokens: float, seq_len: int, multiple_of: int = 1, *, exact: bool = False):
    """Sequences in a batch of `batch_tokens` tokens: rounded to the nearest positive multiple of `multiple_of`
    (the data-parallel size the mesh must split), or with `exact` the plain ratio (a float, for grids that
    snap it to their own lattice). Lives here, the lowest layer that needs it; `qwenjax.hparams` exports it."""
    sequences = batch_tokens / seq_len
    if exact:
        return sequences
    return int(max(1, round(sequences / multiple_of)) * multiple_of)
