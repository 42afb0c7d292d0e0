"""Training checkpoints: Orbax `CheckpointManager` (async) of the train state plus a JSON item.

Layout: `<run_dir>/ckpt/<step>/{state, meta}`; `state` = params, optimizer state, step and RNG key data
(restored directly onto the shardings of an abstract target), `meta` = JSON: the data-iterator state and
what the loop needs to continue exactly (initial loss, elapsed wall time, ...). Orbax writes each step
into a temporary folder and renames it when complete, so a killed save never looks like a checkpoint.
A checkpoint that fails to restore is reported and the previous one is tried.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from qwenjax.errors import UserError

log = logging.getLogger(__name__)


def _reason(e: BaseException) -> str:
    """`Type: first line` of a restore failure, without the object reprs some Orbax/tensorstore errors carry
    instead of a message (`<bound method ...>`, `<... object at 0x...>`)."""
    first = (str(e).strip().splitlines() or [""])[0]
    first = re.sub(r"<[^<>]*(bound method|object at 0x|function )[^<>]*>", "", first).strip(" :;,")
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


class Checkpointer:
    """Save/restore `(state pytree, meta dict)` pairs by step, keeping the newest `keep`."""

    def __init__(self, directory: str | Path, *, keep: int = 2, use_async: bool = True):
        self.directory = Path(directory).expanduser().absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=use_async,
            cleanup_tmp_directories=True)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Start an (async) save of `state` and the JSON `meta` at `step`; returns before the write ends."""
        ocp = self._ocp
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract_state, step: int | None = None) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest checkpoint that restores (or of `step`), else None if there
        are none. `abstract_state`: jax.ShapeDtypeStruct leaves carrying the target shardings."""
        ocp = self._ocp
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        errors = []
        for s in steps:
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # corrupt or incompatible files: report and fall back to an older one
                reason = _reason(e)
                log.warning("checkpoint %s/%d could not be restored (%s); trying the previous one",
                            self.directory, s, reason)
                errors.append(f"step {s}: {reason}")
                continue
            if s != steps[0]:
                self._set_aside([t for t in steps if t > s])
            return s, restored["state"], dict(restored["meta"])
        if errors:
            raise UserError(f"no checkpoint in {self.directory} could be restored ({'; '.join(errors)}); "
                            f"move {self.directory} away (or delete it) to start the run afresh")
        return None

    def restore_meta(self, step: int) -> dict[str, Any]:
        """The JSON meta of checkpoint `step` alone (no arrays are read)."""
        ocp = self._ocp
        return dict(self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unrestorable checkpoints to `corrupt-<step>` (kept for inspection, ignored by Orbax), so the
        resumed run can save those steps again."""
        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                if src.exists():
                    dst = self.directory / f"corrupt-{s}"
                    n = 1
                    while dst.exists():
                        dst, n = self.directory / f"corrupt-{s}.{n}", n + 1
                    src.rename(dst)
                    log.warning("moved the unrestorable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("qwenjax checkpoint set aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry the shardings Orbax should restore onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_tree, shardings)
