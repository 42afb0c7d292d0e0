"""`qwenjax export RUN_DIR --to DIR`: a run's newest parameters as a model directory.

The result is what `model.init_from`, `qwenjax generate --checkpoint` and `qwenjax convert --from DIR
--to-hf` read (`qwenjax.model_io`); a finished run writes the same into `RUN_DIR/model/` by itself.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a run's newest parameters as a model directory",
                              description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (config.yaml, ckpt/)")
    p.add_argument("--to", metavar="DIR", required=True, help="destination model directory (new)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwenjax.train.run_dir import export_model  # JAX loads on use: the CLI's start-up stays fast

    out = export_model(args.run_dir, args.to)
    print(f"wrote {out}")
    return 0
