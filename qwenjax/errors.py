"""Errors the user can fix, and the small helpers that word them.

`UserError` is one exception type for problems the user can fix (bad config, missing file, ...). The CLI
turns it into a single `qwenjax: error: ...` line and a non-zero exit; library callers get an ordinary
exception with the same message. The helpers live here (no dependencies) so that every part words its
hints and its one-line failures the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


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


def read_document(path, loads: Callable[[str], Any], bad: tuple[type[BaseException], ...], *, missing: str,
                  malformed: str) -> Any:
    """`loads` of the text file `path`, with one UserError line for each way it can fail: `missing` when it is
    not a file, `malformed` (given the path and the parser's first line) when it is binary or does not parse.
    `missing` and `malformed` are format strings with `{path}` (and `{reason}`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(missing.format(path=p))
    try:
        return loads(p.read_text())
    except UnicodeDecodeError:
        raise UserError(malformed.format(path=p, reason="not UTF-8 text (a binary file?)")) from None
    except bad as e:
        raise UserError(malformed.format(path=p, reason=(str(e).strip().splitlines() or [""])[0])) from None
