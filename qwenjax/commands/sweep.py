"""`qwenjax sweep SPEC.yaml`: run (or resume, or plan with --dry-run) a learning-rate x batch-size sweep.

Also `qwenjax sweep --bench-population SPEC_OR_CONFIG.yaml`: population throughput vs sequential solo runs.

The sweep machinery is imported inside the functions: the CLI imports every command module to build its
parser, and the planner, the progress display and the fitter (pandas, scipy) would slow every command's start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tqdm import tqdm

from qwenjax.commands import check_output_dir
from qwenjax.errors import UserError
from qwenjax.sweep.local import cpu_slices, worker_env


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a learning-rate x batch-size sweep over N and D (resumable)",
        description="Plan the runs of a sweep spec and train them with local worker processes or Ray. "
                    "Rerun the same command to resume: finished runs (DIR/results.jsonl) are skipped, "
                    "interrupted ones resume from their checkpoints, failed ones are retried.")
    p.add_argument("spec", metavar="SPEC.yaml", help="sweep spec (see docs/sweeps.md)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/sweeps/<spec name>)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local worker processes or Ray tasks (default: %(default)s)")
    p.add_argument("--workers", type=int, metavar="K",
                   help="local: worker processes, each with its share of the cores (default 1); "
                        "ray: most tasks in flight (default: as many as the cluster holds)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the planned runs with FLOPs and a time estimate from a short measured probe")
    p.add_argument("--no-probe", action="store_true", help="--dry-run without measuring step times")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to use (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--max-retries", type=int, default=1, metavar="R",
                   help="retries of a failed run (and Ray retries of lost workers) (default: %(default)s)")
    p.add_argument("--probe-steps", type=int, default=5, metavar="K",
                   help="steps timed by the population-vs-solo probe (default: %(default)s)")
    p.add_argument("--population-mode", choices=("auto", "population", "solo"), default="auto",
                   help="with `population: lr`: decide per shape from a probe (auto), or force one mode")
    p.add_argument("--bench-population", action="store_true",
                   help="benchmark population throughput vs sequential solo runs for SPEC's smallest and "
                        "largest models (or for a run config) instead of sweeping")
    p.add_argument("--members", type=int, default=8,
                   help="--bench-population: population size (default: %(default)s)")
    p.add_argument("--bench-steps", type=int, default=10,
                   help="--bench-population: steps per run (default: %(default)s)")
    p.add_argument("--end-to-end", type=int, default=0, metavar="STEPS",
                   help="--bench-population: also time whole runs of STEPS steps on real data "
                        "(train x members vs one population)")
    p.set_defaults(func=_main)


def _default_out(spec) -> Path:
    return Path("runs") / "sweeps" / spec.name


def _main(args: argparse.Namespace) -> int:
    if args.bench_population:
        return _bench(args)
    from qwenjax.sweep import SweepOptions, run_sweep  # imported on use: see the module docstring
    from qwenjax.sweep.spec import load_spec

    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else _default_out(spec)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    check_output_dir(out, "sweep output folder")
    if args.dry_run:
        return _dry_run(spec, out, args)
    opts = SweepOptions(executor=args.executor, workers=args.workers, max_retries=args.max_retries,
                        ray_address=args.ray_address, population_probe_steps=args.probe_steps,
                        force_population=None if args.population_mode == "auto" else args.population_mode,
                        run_fn=os.environ.get("QWENJAX_SWEEP_RUN_FN") or None)
    summary = run_sweep(spec, out, opts)
    _print_summary(summary)
    failed = summary.get("failed_runs") or []
    for row in failed:  # after the summary, so the reasons are the last thing on screen
        print(f"qwenjax: failed: {row['run_id']}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def _print_summary(s: dict) -> None:
    from qwenjax.scaling.units import format_count  # imported on use: see the module docstring
    from qwenjax.sweep.progress import format_duration

    c = s["counts"]
    print(f"{s['name']}: {s['finished']}/{s['planned_runs']} runs finished ({c.get('ok', 0)} ok, "
          f"{c.get('diverged', 0)} diverged, {c.get('failed', 0)} failed); {s['trained_now']} trained now in "
          f"{format_duration(s['wall_s'])} ({s['executor']})")
    if s["run_wall_s"]:
        print(f"time in runs {format_duration(s['run_wall_s'])}: compile {format_duration(s['compile_s'])} "
              f"({100 * (s['compile_share'] or 0):.1f}%), "
              f"steps/eval/io {format_duration(s['step_and_other_s'])}")
    for d in s["population_decisions"]:
        how = f"{d['strategy']}, " if d.get("strategy") else ""
        print(f"population probe: {d['members']} members -> {d['mode']} ({how}{d['ratio']:.2f}x solo)")
    forks = s["forks"]
    if forks["runs"]:
        print(f"forks: {forks['runs']} runs trained only their cooldown: {format_count(forks['tokens_trained'])} "
              f"tokens trained instead of {format_count(forks['tokens_without_forks'])} "
              f"({100 * forks['saving']:.1f}% saved)")
    for b in s["best_per_cell"]:
        print(f"N={b['n_params']:,} D={b['tokens']:.3g}: best loss {b['loss']:.4f} at lr {b['lr']:.3g}, "
              f"batch {b['batch_size']}")
    noise = s.get("noise") or {}
    if noise.get("relative") is not None:
        print(f"noise floor: {100 * noise['relative']:.2f}% (seed-to-seed spread of the loss at the optimum, "
              f"{noise['cells_measured']} cells, {noise['seeds']}+ seeds each)")
    print(f"results: {Path(s['out_dir']) / 'results.jsonl'}; summary: {Path(s['out_dir']) / 'summary.json'}")


# ---------------------------------------------------------------------------------------------------------
# --dry-run


_PROBE_CODE = """\
import json, sys
from qwenjax.sweep.local import apply_thread_env
apply_thread_env()
from qwenjax.run_config import config_from_dict
from qwenjax.sweep.population import measure
req = json.load(sys.stdin)
out = []
for c in req['cfgs']:
    out.append(measure([config_from_dict(c)], steps=req['steps'], strategies=()))
    print("probed", flush=True)
print(json.dumps(out))
"""


def probe_in_worker(cfgs: list, workers: int, steps: int = 3) -> list[dict]:
    """Time a few real steps of each config in a fresh process with one worker's share of the cores; a
    progress bar on stderr (on a terminal) counts the configs measured."""
    from qwenjax.run_config import config_to_dict  # imported on use: see the module docstring

    cores = cpu_slices(workers)[0]
    req = json.dumps({"cfgs": [config_to_dict(c) for c in cfgs], "steps": steps})
    with tempfile.TemporaryFile("w+") as err, tqdm(total=len(cfgs), desc="step-time probe", unit="shape",
                                                   file=sys.stderr, disable=None, leave=False) as bar:
        # stderr to a file: a chatty child cannot fill a pipe nobody reads while stdout is followed
        proc = subprocess.Popen([sys.executable, "-c", _PROBE_CODE], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=worker_env(cores))
        watchdog = threading.Timer(1800, proc.kill)
        watchdog.start()
        try:
            proc.stdin.write(req)
            proc.stdin.close()
            lines = []
            for line in proc.stdout:
                if line.strip() == "probed":
                    bar.update(1)
                else:
                    lines.append(line)
            proc.wait()
        finally:
            watchdog.cancel()
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["?"])[-1]
        raise UserError(f"the step-time probe failed: {tail}")
    return json.loads(lines[-1])


def planned_devices(spec) -> int | None:
    """Devices each run of the sweep will see, known without starting JAX: the spec's TPU or GPU resources
    per run, else the host-platform device count forced in XLA_FLAGS (CPU); None when only JAX could tell."""
    for key in ("TPU", "GPU"):
        if (spec.resources or {}).get(key):
            return int(spec.resources[key])
    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(forced.group(1)) if forced else None


def check_mesh(run, devices: int) -> None:
    """What `train` checks before starting, from the mesh spec alone: the mesh fills `devices`, and each
    micro-batch splits evenly over the data-parallel axes (mesh.data x mesh.fsdp)."""
    m, t = run.cfg.mesh, run.cfg.train
    sizes = [m.data, m.fsdp, m.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and devices % known == 0:
        sizes[sizes.index(-1)] = devices // known
    if -1 in sizes or math.prod(sizes) != devices:
        raise UserError(f"run {run.run_id}: mesh.data x mesh.fsdp x mesh.tensor = {m.data} x {m.fsdp} x "
                        f"{m.tensor} does not fit {devices} devices")
    micro, dp = t.batch_size // t.grad_accum, sizes[0] * sizes[1]
    if micro % dp:
        raise UserError(f"run {run.run_id}: train.batch_size ({t.batch_size}) / train.grad_accum "
                        f"({t.grad_accum}) = {micro} is not divisible by the data-parallel size mesh.data x "
                        f"mesh.fsdp = {dp} on {devices} devices")


def _dry_run(spec, out: Path, args) -> int:
    from qwenjax.scaling.units import format_count  # imported on use: see the module docstring
    from qwenjax.sweep.plan import Planner, describe, fork_plan, trained_share
    from qwenjax.sweep.progress import format_duration

    planner = Planner(spec, out)
    runs = planner.initial_runs()  # builds (and validates) every planned run's RunConfig
    devices = planned_devices(spec)
    if devices is not None:
        for r in runs:
            check_mesh(r, devices)
    forks = fork_plan(runs) if spec.fork_cooldowns else None
    workers = args.workers or 1
    estimate = None
    if not args.no_probe and runs:
        small = min(runs, key=lambda r: (r.model.n_params, r.batch_size))
        large = max(runs, key=lambda r: (r.model.n_params, r.batch_size))
        probes = [small] if small.shape_key == large.shape_key else [small, large]
        measured = probe_in_worker([r.cfg for r in probes], workers)
        estimate = _time_model(probes, measured)
        for r, m in zip(probes, measured, strict=True):
            print(f"probe {r.model.label} batch {r.batch_size}: {m['solo_step_s'] * 1e3:.1f} ms/step, "
                  f"compile {m['solo_compile_s']:.1f} s ({workers} worker(s)' share of the cores)")
    print(f"{'run_id':12}  {'model':12} {'N':>7} {'D':>7} {'lr':>9} {'batch':>5} {'steps':>6} {'FLOPs':>8} "
          f"{'est':>7}" + ("  forks from" if forks is not None else ""))
    total_s = full_s = 0.0
    for r in sorted(runs, key=lambda r: (r.model.n_params, r.tokens, r.batch_size, r.lr, r.seed)):
        full = estimate(r) if estimate else None
        est = full * trained_share(r, forks or {}) if full else None
        total_s += est or 0.0
        full_s += full or 0.0
        fork = f"  {forks[r.run_id][0].run_id}@{forks[r.run_id][1]}" if forks and r.run_id in forks else ""
        print(f"{r.run_id:12}  {r.model.label:12} {format_count(r.model.n_params):>7} "
              f"{format_count(r.tokens):>7} {r.lr:>9.3g} {r.batch_size:>5} {r.steps:>6} "
              f"{format_count(r.flops):>8} {format_duration(est) if est else '?':>7}{fork}")
    d = describe(runs, forks)
    compile_s = 0.0
    if estimate:
        one_per_shape = {r.shape_key: r for r in runs}.values()
        compile_s = sum(estimate.compile(r) for r in one_per_shape)
    line = (f"total: {d['runs']} runs in {d['cells']} cells ({d['shapes']} compiled shapes), "
            f"{format_count(d['flops'])} FLOPs, {format_count(d['tokens'])} tokens")
    if estimate:
        line += (f"; estimated {format_duration((total_s + compile_s) / workers)} with {workers} worker(s) "
                 f"(steps {format_duration(total_s)}, compiles {format_duration(compile_s)} in total)")
    if spec.max_extensions:
        line += f"; plus up to {spec.max_extensions} grid extensions per cell whose optimum sits on an edge"
    print(line)
    if forks is not None:
        saving = 1.0 - d["tokens_with_forks"] / d["tokens"] if d["tokens"] else 0.0
        line = (f"forks: {d['forks']} runs train only their cooldown from a longer run's state: "
                f"{format_count(d['tokens_with_forks'])} tokens trained instead of {format_count(d['tokens'])} "
                f"({100 * saving:.1f}% saved)")
        if estimate:
            line += (f"; steps {format_duration(total_s)} instead of {format_duration(full_s)} "
                     f"(included in the estimate above)")
        print(line)
    return 0


class _TimeModel:
    """Seconds per step = a + b x FLOPs per step, through the measured smallest and largest shapes."""

    def __init__(self, points: list[tuple[float, float, float]]):
        (f1, t1, c1) = points[0]
        (f2, t2, c2) = points[-1]
        if len(points) == 1 or f2 <= f1:
            self.a, self.b = 0.0, t1 / f1
            self.ca, self.cb = c1, 0.0
        else:
            self.b = (t2 - t1) / (f2 - f1)
            self.a = t1 - self.b * f1
            if self.a < 0 or self.b < 0:  # noisy probe: proportional through the larger point
                self.a, self.b = 0.0, t2 / f2
            self.cb = max(0.0, (c2 - c1) / (f2 - f1))
            self.ca = max(0.0, c1 - self.cb * f1)

    def __call__(self, run) -> float:
        f = run.flops / run.steps
        return run.steps * (self.a + self.b * f)

    def compile(self, run) -> float:
        return self.ca + self.cb * run.flops / run.steps


def _time_model(probes, measured) -> _TimeModel:
    points = [(r.flops / r.steps, m["solo_step_s"], max(0.0, m["solo_compile_s"]))
              for r, m in zip(probes, measured, strict=True)]
    return _TimeModel(sorted(points))


# ---------------------------------------------------------------------------------------------------------
# --bench-population


def _bench(args: argparse.Namespace) -> int:
    import yaml  # imported on use: see the module docstring

    from qwenjax.bench_population import benchmark_population
    from qwenjax.run_config import load_config

    path = Path(args.spec)
    if not path.is_file():
        raise UserError(f"not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    targets = []
    if isinstance(tree, dict) and ("tokens" in tree or "models" in tree or "ladder" in tree):
        from qwenjax.sweep.plan import Planner  # imported on use: see the module docstring
        from qwenjax.sweep.spec import load_spec

        spec = load_spec(path)
        planner = Planner(spec, Path(args.out or "runs/bench"))
        runs = planner.initial_runs()
        by_n = sorted(runs, key=lambda r: r.model.n_params)
        batches = sorted({r.batch_size for r in runs})
        mid = batches[len(batches) // 2]
        for pick in (by_n[0], by_n[-1]):
            r = next(x for x in runs if x.model.index == pick.model.index and x.batch_size == mid)
            targets.append((f"{spec.name} {r.model.label}", r.cfg))
        if targets[0][1].model == targets[1][1].model:
            targets = targets[:1]
    else:
        targets.append((path.stem, load_config(path)))
    results = []
    for label, cfg in targets:
        workdir = Path(args.out) / "bench_runs" / label.replace(" ", "_") if args.out else None
        m = benchmark_population(cfg, members=args.members, steps=args.bench_steps,
                                 end_to_end=bool(args.end_to_end), end_to_end_steps=args.end_to_end or 50,
                                 workdir=workdir)
        m["label"] = label
        results.append(m)
        ratios = ", ".join(f"{s} {d['ratio']:.2f}x (compile {d['compile_s']:.1f}s)"
                           for s, d in m["strategies"].items())
        print(f"{label}: N={m['n_params']:,} batch {m['batch_size']}x{m['seq_len']}: solo "
              f"{m['solo_step_s'] * 1e3:.1f} ms/step; {args.members} members vs {args.members} sequential "
              f"solo runs: {ratios}; best {m['best']}", flush=True)
        if "end_to_end" in m:
            e = m["end_to_end"]
            print(f"{label}: end to end, {e['steps']} steps on real data: {args.members} solo runs "
                  f"{e['solo_s'] - e['solo_compile_s']:.1f}s vs population ({e['strategy']}) "
                  f"{e['population_s'] - e['population_compile_s']:.1f}s (compile excluded): "
                  f"{e['ratio']:.2f}x", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_population.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m qwenjax.commands.sweep ...`: this command alone, with the CLI's error handling (a sweep
    launched as a subprocess, e.g. by the tests, does not need every other command to import)."""
    from qwenjax.cli import main as cli_main  # cli imports this module: a module-level import would be a cycle

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)], commands=("sweep",))


if __name__ == "__main__":
    sys.exit(main())
