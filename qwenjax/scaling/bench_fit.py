"""How long `qwenjax fit` takes on a big sweep: about 2,000 runs in 20 cells, the default bootstrap.

    python -m qwenjax.scaling.bench_fit [--repeat 3] [-- EXTRA FIT ARGS]

Writes synthetic results (5 N x 4 D cells, 7 lrs x 5 batches, 3 seeds each: 2,100 runs, 0.3% noise) to a
temporary folder and times the whole command in a fresh interpreter, imports included, as a user meets it.
The target is under 10 s on the project's 2-core machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwenjax.scaling.synthetic import synthetic_results, write_results

N_VALUES = (1e6, 2e6, 4e6, 8e6, 16e6)
D_VALUES = (2.5e7, 5e7, 1e8, 2e8)


def bench_results(path: Path) -> int:
    """Write the benchmark's results file; returns its number of runs."""
    rows = synthetic_results(
        n_values=N_VALUES, d_values=D_VALUES, lr_span=3, batch_span=2, noise=3e-3, seeds=3, seed=0
    )
    write_results(path, rows)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwenjax.scaling.bench_fit", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (default 3; the median is reported)")
    parser.add_argument("fit_args", nargs=argparse.REMAINDER, help="extra `qwenjax fit` arguments after --")
    args = parser.parse_args(argv)
    extra = [a for a in args.fit_args if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.jsonl"
        runs = bench_results(results)
        command = [sys.executable, "-m", "qwenjax.cli", "fit", str(results), "-o", str(Path(tmp) / "FIT.json"), *extra]
        times = []
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
    cells = len(N_VALUES) * len(D_VALUES)
    print(
        f"qwenjax fit on {runs} runs in {cells} cells{' ' + ' '.join(extra) if extra else ''}: "
        f"median {statistics.median(times):.2f} s over {len(times)} runs ({', '.join(f'{t:.2f}' for t in times)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
