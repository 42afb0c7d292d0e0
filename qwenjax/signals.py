"""SIGTERM and SIGINT as a request to stop cleanly: a flag the loops read once per step, not an exception
thrown into the middle of a step or a checkpoint write.

Preemption (a TPU VM or a shared GPU node being taken back) arrives as SIGTERM, a user's Ctrl-C as SIGINT.
`stop_signals()` installs handlers that only record the signal, for the duration of a run (the previous
handlers come back after), and only in the main thread (Python delivers signals there alone). Contexts nest:
a sweep worker holds one for its lifetime and each run it trains holds one too; they share the flag. The
caller finishes its step, saves, and raises `Interrupted`, whose exit status is the shell's for that signal
(128 + signum: 143 for SIGTERM, 130 for SIGINT). A context given `immediate=MESSAGE` raises at once instead,
except inside `deferred()`: a run stops its data preparation or compilation at once (there is nothing to
save yet) and only its steps wait for the flag. Standard library only: the sweep driver imports it without
JAX.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_requested: int | None = None
_depth = 0
_immediate: str | None = None  # the message to raise Interrupted with at once; None: only record the signal


class Interrupted(KeyboardInterrupt):
    """A run or sweep stopped on a signal after saving what it could; `str(e)` is the one line to print and
    `exit_code` the status to exit with. A KeyboardInterrupt, so `except Exception` does not swallow it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def requested() -> int | None:
    """The signal received since the outermost `stop_signals()` began, or None (a plain Python read)."""
    return _requested


def _handler(signum, frame) -> None:
    global _requested
    if _requested is None:  # a repeat (a forwarded copy, a second Ctrl-C) must not cut the save short
        _requested = signum
        if _immediate is not None:
            raise Interrupted(signum, _immediate.format(signal=signal_name(signum)))


@contextlib.contextmanager
def _mode(immediate: str | None) -> Iterator[None]:
    global _immediate
    saved, _immediate = _immediate, immediate
    try:
        yield
    finally:
        _immediate = saved


def deferred() -> contextlib.AbstractContextManager:
    """Inside a `stop_signals(immediate=...)` block: only record signals (the loop reads `requested()`)."""
    return _mode(None)


@contextlib.contextmanager
def stop_signals(immediate: str | None = None) -> Iterator[None]:
    """Record SIGTERM/SIGINT instead of dying (read them with `requested()`) until the block ends, or with
    `immediate` raise `Interrupted(signum, immediate.format(signal=NAME))` (outside `deferred()`). Outside the
    main thread it installs nothing and `requested()` stays None."""
    global _requested, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _requested = None
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _depth += 1
    try:
        with _mode(immediate):
            yield
    finally:
        _depth -= 1
        for s, h in previous.items():
            signal.signal(s, h)
