"""`qwenjax demo --out runs/demo [--data PATH]`: the whole pipeline end to end, with a Markdown report."""

from __future__ import annotations

import argparse
import os

_DESCRIPTION = (
    "Trains a tokenizer on a corpus (default: this Python's standard library), sweeps small "
    "models over lr x batch at several (N, D), fits the scaling laws, predicts lr and batch "
    "for a larger model trained on more tokens, trains a 3x3 grid of 0.5x / 1x / 2x the "
    "predicted lr and batch around it (every point with two seeds) and writes "
    "OUT/report.md with a PASSED / MISSED verdict. "
    "Rerunning reuses finished stages."
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="sweep, fit, predict, train and report end to end on this machine",
        description=_DESCRIPTION)
    p.add_argument("--out", default=None,
                   help="output folder (default runs/demo; runs/long-demo with --long, runs/post-demo with --post)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="text, JSONL or Parquet file, glob or folder (default: the Python standard library)")
    p.add_argument("--plan", choices=("full", "mini"), default="full",
                   help="full (about 10 min on 2 cores) or mini (a miniature for smoke tests)")
    p.add_argument("--workers", type=int, default=None,
                   help="sweep worker processes (default: one per CPU core, at most 4)")
    p.add_argument("--long", action="store_true",
                   help="the long-context study instead: train a tiny model short, then compare passkey and loss by "
                        "position at 4x its length for the base, an ABF stage, YaRN and DCA (qwenjax/demo_long.py)")
    p.add_argument("--post", action="store_true",
                   help="the post-training study instead: pre-train a tiny model on a+b=, then SFT, DPO on sampled "
                        "pairs and GRPO (2 seeds), held-out accuracy after each (qwenjax/demo_post.py)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # on use: `qwenjax --help` and the other commands start without loading JAX or this command's code
    from qwenjax.demo import run_demo
    from qwenjax.errors import UserError

    if args.post:
        if getattr(args, "long", False):
            raise UserError("--long and --post are two different demos: give one of them")
        return _run_post(args)
    if args.long:
        if getattr(args, "post", False):
            raise UserError("--long and --post are two different demos: give one of them")
        return _run_long(args)
    workers = args.workers if args.workers is not None else max(1, min(4, os.cpu_count() or 1))
    if workers < 1:
        raise UserError(f"--workers must be positive, got {workers}")
    report = run_demo(args.out or "runs/demo", args.data, plan=args.plan, workers=workers)
    print(report["path"])
    print(report["verdict"])
    return 0


def _run_long(args: argparse.Namespace) -> int:
    from qwenjax.demo_long import run_long_demo  # on use, as above
    from qwenjax.errors import UserError

    if args.data is not None or args.workers is not None:
        raise UserError("--long trains on its own synthetic passkey corpus in one process: drop --data and --workers")
    report = run_long_demo(args.out or "runs/long-demo", plan=args.plan)
    print(report["path"])
    print(report["verdict"])
    return 0


def _run_post(args: argparse.Namespace) -> int:
    from qwenjax.demo_post import run_post_demo  # on use, as above
    from qwenjax.errors import UserError

    if args.data is not None or args.workers is not None:
        raise UserError("--post builds its own synthetic arithmetic task in one process: drop --data and --workers")
    report = run_post_demo(args.out or "runs/post-demo", plan=args.plan)
    print(report["path"])
    print(report["verdict"])
    return 0
