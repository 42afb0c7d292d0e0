"""What a run does about the world outside it: one writer per run directory, and stopping on a signal.

The run-directory lock (`qwenjax.lock`): in a multi-process run only process 0 takes it (the others write
nothing there by themselves: Orbax coordinates the checkpoint writes, metrics and summary are process 0's),
and tells the others whether it got it, once at the start, so a refused job stops in every process rather
than leaving the rest waiting in a collective.

Stopping: one process reads the signal flag of `qwenjax.signals` once per step (a Python value, no device
sync). Several processes must agree on the step they stop at, or the ones that go on wait forever in the
next collective: they ask JAX's preemption sync point instead (`jax.distributed` installs its own SIGTERM
notifier and agrees on a step through the coordination service), and take over no signal handler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from qwenjax import signals
from qwenjax.errors import UserError
from qwenjax.lock import DirLock


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Hold `run_dir/.lock` for the block (process 0 of a multi-process run; every other process waits
    for its verdict)."""
    lock = DirLock(run_dir, "run_dir")
    refusal = None
    if is_main:
        try:
            lock.acquire()
        except UserError as e:
            refusal = e
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
        if not ok and refusal is None:
            raise UserError(f"{run_dir} is in use (process 0 could not lock it); wait for it or stop it")
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        lock.release()


NOTHING_SAVED = "interrupted ({signal}) before or after the training steps; nothing new was saved"


def steps() -> contextlib.AbstractContextManager:
    """The training steps and the save after them: a signal waits for the end of the step."""
    return signals.deferred()


@contextlib.contextmanager
def stop_check() -> Iterator[Callable[[int], int | None]]:
    """`should_stop(step) -> signum or None`, for the block (see the module docstring). Outside `steps()` a
    signal stops the run at once: data preparation and compilation have nothing to save."""
    if jax.process_count() > 1:
        def synced(step: int) -> int | None:
            try:
                return signals.SIGNALS[0] if multihost_utils.reached_preemption_sync_point(step) else None
            except RuntimeError:  # the preemption service is off: runs of this job cannot stop together
                return None

        yield synced
        return
    with signals.stop_signals(immediate=NOTHING_SAVED):
        yield lambda step: signals.requested()


def interrupted(signum: int, step: int, saved_in: Path | None, already: bool = False) -> signals.Interrupted:
    """The exception (and its one line) of a run stopped at `step`: where its state is, or that none is."""
    name = signals.signal_name(signum)
    if saved_in is not None:
        where = f"checkpoint {'already ' if already else ''}saved in {saved_in}"
        return signals.Interrupted(signum, f"interrupted ({name}) at step {step}; {where}; rerun the same "
                                           "command to resume")
    return signals.Interrupted(signum, f"interrupted ({name}) at step {step}; nothing was saved "
                                       "(checkpoint.enabled is false, or no step was trained): a rerun "
                                       "starts again")
