"""`qwenjax plan` for the seven Qwen2.5 sizes at seq_len 4096 on v5p slices; writes the table into
docs/scaling-out.md (between its plan-table markers) and the raw plans to docs/scaling-out.jsonl.

    python scripts/plan_table.py [--max-compiles 4] [--only 0.5b,7b]

Each size runs as its own `qwenjax plan` process (each needs its own number of simulated devices). The batch is
two sequences per data-parallel replica (global batch = 2 x mesh.data x mesh.fsdp), so the search can still
try grad_accum 2 after the remat policies. Meshes are the configs' own: FSDP over the slice, tensor 4 for 32B
and 8 for 72B.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling-out.md"
RAW = ROOT / "docs" / "scaling-out.jsonl"
START, END = "<!-- plan-table -->", "<!-- /plan-table -->"
SEQ_LEN = 4096
GIB = 2**30

#: size -> (topology, mesh.tensor): v5p names count TensorCores, two per chip (one JAX device per chip)
SIZES = {
    "0.5b": ("v5p-16", 1), "1.5b": ("v5p-32", 1), "3b": ("v5p-64", 1), "7b": ("v5p-128", 1),
    "14b": ("v5p-256", 1), "32b": ("v5p-512", 4), "72b": ("v5p-512", 8),
}


def run_plan(size: str, max_compiles: int) -> dict:
    topo, tensor = SIZES[size]
    devices = int(topo.split("-")[1]) // 2
    batch = 2 * devices // tensor
    argv = [sys.executable, "-m", "qwenjax.cli", "plan", str(ROOT / "configs" / f"qwen2.5-{size}.yaml"),
            f"train.seq_len={SEQ_LEN}", f"train.batch_size={batch}", "mesh.data=1", "mesh.fsdp=-1",
            f"mesh.tensor={tensor}", "--topology", topo, "--max-compiles", str(max_compiles)]
    t0 = time.perf_counter()
    r = subprocess.run(argv, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{size}: {r.stderr.strip()[-2000:]}")
    plan = json.loads(r.stdout)
    plan["size"], plan["wall_s"] = size, round(time.perf_counter() - t0, 1)
    return plan


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def row(p: dict) -> str:
    m, mem, f, c = p["mesh"], p["memory_per_device"], p["flops"], p["collectives_per_step"]
    fit = "yes" if p["fits"] else "no"
    search = p.get("search")
    if search:
        found = search["fits_with"]
        fit += (f"; fits with remat={found['remat']}, grad_accum={found['grad_accum']} "
                f"({_gib(found['peak_bytes'])} GiB)") if found else (
            f"; not with {', '.join(t['remat'] + '/' + str(t['grad_accum']) for t in search['tried'])}")
    return (f"| {p['size']} | {m['data']}x{m['fsdp']}x{m['tensor']} | {p['devices']} ({p['topology']['name']}) | "
            f"{p['batch']['global_sequences']} x {p['batch']['seq_len']} | {_gib(mem['parameters'])} | "
            f"{_gib(mem['optimizer_state'])} | {_gib(mem['gradients'])} | {_gib(mem['activations'])} | "
            f"{_gib(mem['temporaries'])} | {_gib(mem['peak'])} | {fit} | {f['model_per_device']:.3g} | "
            f"{f['xla_per_device']:.3g} | {_gib(c['total'])} | {p['compile_s']:.0f} |")


def _commit() -> str:
    r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or os.environ.get("QWENJAX_COMMIT", "unknown")  # a `git archive` export has no .git


def table(plans: list[dict], total_s: float, commit: str) -> str:
    head = ("| size | mesh (data x fsdp x tensor) | devices | batch (seq x len) | params GiB | opt GiB | grads GiB | "
            "activations GiB | temp GiB | peak GiB | fits in 95 GiB? | model FLOPs/device | XLA FLOPs/device | "
            "collectives GiB/step | compile s |\n" + "|---" * 15 + "|")
    lines = [head, *(row(p) for p in plans)]
    lines.append(f"\nMeasured by `python scripts/plan_table.py` in {total_s / 60:.1f} min on a 2-core CPU machine "
                 f"at commit {commit} (all per device; GiB = 2^30 bytes; remat none first, then the search).")
    return "\n".join(lines)


def write(plans: list[dict], total_s: float, commit: str) -> None:
    """The raw plans and the table so far (rewritten after each size, so a long run leaves partial results)."""
    RAW.write_text("".join(json.dumps(p) + "\n" for p in plans))
    text = DOC.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{DOC} has no {START} ... {END} markers")
    before, rest = text.split(START, 1)
    DOC.write_text(before + START + "\n" + table(plans, total_s, commit) + "\n" + END + rest.split(END, 1)[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-compiles", type=int, default=4)
    ap.add_argument("--only", default=",".join(SIZES), help="comma-separated sizes")
    args = ap.parse_args()
    t0, commit = time.perf_counter(), _commit()
    plans = []
    for size in args.only.split(","):
        plans.append(run_plan(size, args.max_compiles))
        print(f"{size}: {plans[-1]['wall_s']} s, fits={plans[-1]['fits']}", file=sys.stderr, flush=True)
        write(plans, time.perf_counter() - t0, commit)
    print(f"wrote {DOC.relative_to(ROOT)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
