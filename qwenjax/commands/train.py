"""`qwenjax train CONFIG.yaml [KEY=VALUE ...] [--hparams FIT.json]`: one training run (resumes if it can)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys

import yaml

from qwenjax.commands import check_output_dir
from qwenjax.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (resumes from the run directory's latest checkpoint)",
        description="Train one model. The config is YAML (may inherit with `base: other.yaml`); KEY=VALUE "
                    "overrides use dotted keys (train.steps=100 optim.lr=1e-3). Writes config.yaml, "
                    "metrics.jsonl, summary.json and ckpt/ under run_dir. Rerunning the same command "
                    "resumes.")
    p.add_argument("config", metavar="CONFIG.yaml", nargs="?", default=None,
                   help="run config (default: the built-in defaults)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="dotted config overrides")
    p.add_argument("--hparams", metavar="FIT.json", default=None,
                   help="set optim.lr and train.batch_size from a scaling-law fit, then train.steps so the "
                        "run trains the planned tokens (train.tokens, else the config's steps); an explicit "
                        "KEY=VALUE lr or batch still wins")
    p.add_argument("--force", action="store_true",
                   help="with --hparams: use a fit whose quality flags a law unusable (see FIT.json quality)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (after overrides and --hparams) as YAML and exit")
    p.set_defaults(func=_run)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced, e.g. by pytest's capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    logger = logging.getLogger("qwenjax")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _run(args: argparse.Namespace) -> int:
    # imported on use (here and below): keeps every command's start-up free of OmegaConf, JAX and the fitter
    from qwenjax.run_config import config_to_dict, load_config, parse_overrides

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # `qwenjax train train.steps=10` (no YAML)
    override_tree = parse_overrides(overrides)  # parsed once: the config and --hparams both read the tree
    cfg = load_config(config, override_tree)
    _setup_logging()
    log = logging.getLogger("qwenjax.train")
    from qwenjax.hparams import apply_hparams, explicit_overrides  # after the config: bad input fails fast
    from qwenjax.train import train

    if args.hparams:
        cfg, notes = apply_hparams(cfg, args.hparams, explicit_overrides(override_tree), force=args.force)
        for note in notes:
            log.info("%s", note)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    check_output_dir(cfg.run_dir, "run_dir")
    if cfg.train.wandb == "true" and importlib.util.find_spec("wandb") is None:
        raise UserError("train.wandb is true but wandb is not installed (pip install wandb, or set it to auto)")
    summary = train(cfg)
    keys = ("status", "steps_completed", "tokens", "final_loss", "eval_loss", "wall_s", "mfu")
    print(json.dumps({k: summary.get(k) for k in keys}))
    return 0
