"""Errors the user can fix, and the small helpers that word them.

`UserError` is one exception type for problems the user can fix (bad config, missing file, ...). The CLI
turns it into a single `qwenjax: error: ...` line and a non-zero exit; library callers get an ordinary
exception with the same message. The helpers live here (no dependencies) so that every part words its
hints and its one-line failures the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input: the message names the problem and, where possible, the fix."""


def did_you_mean(word: object, candidates: Iterable[str], *, list_known: bool = False,
                 cutoff: float = 0.5) -> str:
    """A hint to append to an error message: ` (did you mean 'x'?)` for the closest candidate; without one,
    ` (known: a, b, ...)` if `list_known`, else nothing."""
    candidates = list(candidates)
    close = difflib.get_close_matches(str(word), candidates, n=1, cutoff=cutoff)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(candidates)})" if list_known else ""


def one_line(e: BaseException) -> str:
    """`Type: first line of the message` (at most 500 characters): an exception as a result field or log line."""
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:500] if text else type(e).__name__
