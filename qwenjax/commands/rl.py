"""`qwenjax rl CONFIG.yaml [KEY=VALUE ...]`: GRPO on prompts with verifiable answers (qwenjax.post.rl_loop)."""

from __future__ import annotations

import argparse
import json

from qwenjax.commands import check_output_dir


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "rl", help="GRPO: sample G answers per prompt, score them, a clipped policy-gradient step",
        description="Online RL with GRPO. Each of train.steps rounds samples rl.group_size answers to each of "
                    "rl.prompts_per_step prompts (rl.prompts: JSONL with \"answer\" or \"tests\", as qwenjax "
                    "pairs reads), scores them with rl.verifier, and takes one step of the clipped objective "
                    "with a KL penalty to the starting model (model.init_from). Writes config.yaml, "
                    "metrics.jsonl, summary.json and model/ under run_dir.")
    p.add_argument("config", metavar="CONFIG.yaml", nargs="?", default=None,
                   help="run config (default: the built-in defaults)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="dotted config overrides (rl.group_size=8)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # imported on use: `qwenjax --help` and the other commands start without loading JAX
    from qwenjax.commands.train import _setup_logging
    from qwenjax.run_config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    check_output_dir(cfg.run_dir, "run_dir")
    _setup_logging()
    from qwenjax.post.rl_loop import run_rl

    summary = run_rl(cfg)
    print(json.dumps(summary))
    return 0
