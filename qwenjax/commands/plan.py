"""`qwenjax plan CONFIG.yaml [KEY=VALUE ...] --devices N [--hbm 95GiB] [--topology v5p-256]`: memory,
FLOPs and collectives of the real train step compiled for N simulated devices; prints one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="compile the train step for N simulated devices: memory per device, FLOPs, collectives",
        description="Lowers and compiles the train step `qwenjax train` would run (same shardings, donated "
                    "state) for N simulated CPU devices from abstract inputs (nothing is allocated), and prints "
                    "one JSON object: bytes per device (parameters, optimizer state, gradients, activations, "
                    "temporaries), our FLOPs and XLA's, collective bytes per step, tokens per device, whether it "
                    "fits in --hbm and, if not, which train.remat and train.grad_accum would. See "
                    "docs/scaling-out.md.")
    p.add_argument("config", metavar="CONFIG.yaml", nargs="?", default=None)
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="dotted config overrides")
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices (default: the --topology's chips)")
    p.add_argument("--hbm", default=None, help="memory per device, e.g. 95GiB, 16GB, 80e9 "
                                               "(default: the --topology's chip, else no fit check)")
    p.add_argument("--topology", default=None, help="v5p-256, v5e-16, v4-8, v6e-8, h100-8, ...: sets the chip's "
                                                    "HBM and peak FLOP/s, and --devices when omitted")
    p.add_argument("--max-compiles", type=int, default=6,
                   help="when it does not fit: at most this many candidate compiles in the search (0: no search)")
    p.set_defaults(func=_run)


def _argv(args: argparse.Namespace, config, overrides, devices: int) -> list[str]:
    argv = ["plan", *([config] if config else []), *overrides, "--devices", str(devices),
            "--max-compiles", str(args.max_compiles)]
    argv += ["--hbm", args.hbm] if args.hbm else []
    return argv + (["--topology", args.topology] if args.topology else [])


def _run(args: argparse.Namespace) -> int:
    # on use: `qwenjax --help` and the other commands start without loading JAX
    from qwenjax.errors import UserError
    from qwenjax.run_config import load_config
    from qwenjax.train import plan

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    topo = plan.topology(args.topology) if args.topology else None
    hbm = plan.parse_bytes(args.hbm) if args.hbm else (topo["hbm_bytes"] if topo else None)
    devices = args.devices if args.devices is not None else (topo["chips"] if topo else None)
    if devices is None or devices < 1:
        raise UserError("plan: give --devices N (a positive integer) or --topology")
    if args.max_compiles < 0:
        raise UserError("--max-compiles must be 0 or more")
    cfg = load_config(config, overrides)
    sizes = plan.resolve_mesh(cfg, devices)  # bad input fails here, before any compile
    plan.check_batch(cfg.train.batch_size, cfg.train.grad_accum, sizes["data"] * sizes["fsdp"])
    if not plan.host_devices(devices):
        # JAX started earlier in this process with fewer CPU devices: run in a fresh one that can have N
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, "-m", "qwenjax.cli", *_argv(args, config, overrides, devices)],
                              env=env, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
            raise UserError(last.removeprefix("qwenjax: error: ") or f"plan: subprocess status {proc.returncode}")
        return 0
    print(json.dumps(plan.plan(cfg, devices, hbm=hbm, topo=topo, max_compiles=args.max_compiles)))
    return 0
