"""`qwenjax bench train [CONFIG.yaml] [KEY=VALUE ...]`: train-step tokens/s and MFU, against PyTorch."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure throughput (tokens/s, MFU), side by side with PyTorch")
    sub = p.add_subparsers(dest="bench_kind", required=True)
    t = sub.add_parser(
        "train", help="train-step throughput of qwenjax and transformers Qwen2 + torch AdamW",
        description="Times the jitted train step on random tokens and, with the hf extra installed, "
                    "transformers' Qwen2ForCausalLM + torch.optim.AdamW on the same shapes and CPU threads, "
                    "alternating in one process. Prints one JSON line. Default shape: 12.6M parameters "
                    "(vocab 8192, hidden 384, 6 layers, 6/2 heads), batch 8 x 512.")
    t.add_argument("config", metavar="CONFIG.yaml", nargs="?", default=None)
    t.add_argument("overrides", metavar="KEY=VALUE", nargs="*")
    t.add_argument("--steps", type=int, default=3, help="steps per timed round (default 3)")
    t.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    t.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    t.add_argument("--profile", action="store_true",
                   help="also time the step's parts (dots, attention, elementwise, loss, optimizer) on both sides")
    t.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # on use: `qwenjax --help` and the other commands start without loading JAX or this command's code
    from qwenjax.bench import BENCH_OVERRIDES, bench_train
    from qwenjax.errors import UserError
    from qwenjax.run_config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    if args.steps < 1 or args.rounds < 1:
        raise UserError("--steps and --rounds must be positive")
    defaults = [f"{k}={v}" for k, v in BENCH_OVERRIDES.items()] if config is None else []
    cfg = load_config(config, defaults + overrides)
    print(json.dumps(bench_train(cfg, steps=args.steps, rounds=args.rounds, with_torch=not args.no_torch,
                                  profile=args.profile)))
    return 0
