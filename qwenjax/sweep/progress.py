"""Live progress of a sweep: runs done / running / left, ETA, and the best loss so far per (N, D) cell.

On a terminal it is a `rich` live table redrawn in place; otherwise (CI, a log file, a pipe) it prints one
plain line per finished run, so logs stay readable and greppable. The ETA divides the FLOPs still to train
by the FLOP rate the sweep has achieved so far (all workers together), which is what matters for a grid
whose runs differ in cost by 100x.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable

from qwenjax.scaling.units import format_count
from qwenjax.sweep.results import row_loss


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts and best losses; `start/finish/add_planned` are called by the driver as events arrive."""

    def __init__(self, name: str, *, live: bool | None = None, stream=None):
        self.name = name
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.t0 = time.monotonic()
        self.planned: dict[str, float] = {}  # run_id -> flops
        self.done: set[str] = set()
        self.running: set[str] = set()
        self.counts = {"ok": 0, "diverged": 0, "failed": 0, "skipped": 0}
        self.flops_done_now = 0.0  # trained in this invocation (for the rate)
        self.best: dict[str, tuple[float, dict]] = {}  # cell label -> (loss, row)
        self._live = None

    # -- events ---------------------------------------------------------------------------------------
    def add_planned(self, run_id: str, flops: float) -> None:
        self.planned.setdefault(run_id, float(flops))

    def skipped(self, row: dict) -> None:
        """A run finished by an earlier invocation."""
        self.done.add(row["run_id"])
        self.counts["skipped"] += 1
        self._note_best(row)

    def start(self, run_id: str) -> None:
        self.running.add(run_id)
        self._refresh()

    def finish(self, row: dict) -> None:
        rid = row["run_id"]
        self.running.discard(rid)
        self.done.add(rid)
        self.counts[row.get("status", "failed")] = self.counts.get(row.get("status", "failed"), 0) + 1
        self.flops_done_now += self.planned.get(rid, 0.0)
        self._note_best(row)
        if not self.live:
            loss = row_loss(row)
            shown = f"loss {loss:.4f}" if math.isfinite(loss) else row.get("status")
            print(f"[{len(self.done)}/{len(self.planned)}] {row.get('name', rid)} {shown} "
                  f"({row.get('mode', 'solo')}, {row.get('wall_s') or 0:.1f}s) "
                  f"eta {format_duration(self.eta())}", file=self.stream, flush=True)
        self._refresh()

    def retry(self, run_id: str) -> None:
        self.running.discard(run_id)
        self._refresh()

    def _note_best(self, row: dict) -> None:
        loss = row_loss(row)
        if not math.isfinite(loss):
            return
        cell = f"N={format_count(row['n_params'])} D={format_count(row['tokens'])}"
        if cell not in self.best or loss < self.best[cell][0]:
            self.best[cell] = (loss, row)

    # -- derived --------------------------------------------------------------------------------------
    def eta(self) -> float | None:
        left = sum(f for rid, f in self.planned.items() if rid not in self.done)
        elapsed = time.monotonic() - self.t0
        if left == 0:
            return 0.0
        if self.flops_done_now <= 0 or elapsed <= 0:
            return None
        return left / (self.flops_done_now / elapsed)

    def status_line(self) -> str:
        left = len(self.planned) - len(self.done) - len(self.running)
        c = self.counts
        return (f"{self.name}: {len(self.done)}/{len(self.planned)} done ({c['ok']} ok, "
                f"{c['diverged']} diverged, {c['failed']} failed, {c['skipped']} from before), "
                f"{len(self.running)} running, {left} left, "
                f"elapsed {format_duration(time.monotonic() - self.t0)}, eta {format_duration(self.eta())}")

    def best_lines(self) -> Iterable[str]:
        for cell, (loss, row) in sorted(self.best.items()):
            yield f"{cell}: best loss {loss:.4f} at lr {row['lr']:.3g}, batch {row['batch_size']}"

    # -- rendering ------------------------------------------------------------------------------------
    def _table(self):
        from rich.table import Table  # optional: only a live table (see __enter__) gets here

        table = Table(title=self.status_line(), title_justify="left", expand=False)
        for col in ("cell (N, D)", "best loss", "lr", "batch"):
            table.add_column(col)
        for cell, (loss, row) in sorted(self.best.items()):
            table.add_row(cell, f"{loss:.4f}", f"{row['lr']:.3g}", str(row["batch_size"]))
        return table

    def __enter__(self) -> Progress:
        if self.live:
            try:
                # rich is optional (not a dependency): without it progress is printed line by line
                from rich.console import Console
                from rich.live import Live

                self._live = Live(self._table(), console=Console(file=self.stream), refresh_per_second=2,
                                  transient=False)
                self._live.__enter__()
            except ImportError:
                self.live = False
        return self

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._table())

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)
            self._live = None
