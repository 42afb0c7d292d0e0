"""The thin command-line layer: parse arguments, call importable functions, print one line on bad input.

Each subcommand lives in `qwenjax/commands/<name>.py` and exposes `register(subparsers)`, which adds
its parser and sets `func` (called with the parsed namespace, returns an exit status).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from qwenjax.errors import UserError

COMMANDS = ("convert", "generate", "tokenizer", "train", "export", "bench", "sweep", "fit", "predict", "demo",
            "plan", "eval", "pairs", "rl")


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's), or "unknown" when run from a bare source tree."""
    try:
        return importlib.metadata.version("qwenjax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def printable(text: str) -> str:
    """One line whatever a message quotes (a path or value from the input): line breaks and other control
    characters escaped as Python writes them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + line
        raise UserError(f"{self.prog}: {message}")


def build_parser(commands=COMMANDS) -> argparse.ArgumentParser:
    parser = _Parser(prog="qwenjax", description="Qwen2.5 in JAX/Flax with hyperparameter scaling-law sweeps.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in commands:
        module = importlib.import_module(f"qwenjax.commands.{name}")
        module.register(sub)
    return parser


def parse_args(argv: list[str] | None = None, commands=COMMANDS) -> argparse.Namespace:
    """Parse a command line; raises UserError (one line) on an unknown subcommand or flag."""
    parser = build_parser(commands)
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may also follow options (`train CONFIG --hparams F optim.lr=...`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None, commands=COMMANDS) -> int:
    """Run a command line; `commands` limits which subcommands are imported (a standalone entry point)."""
    try:
        args = parse_args(argv, commands)
        status = args.func(args)
    except UserError as e:
        print(f"qwenjax: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or qwenjax.signals.Interrupted: a run stopped on a signal, saved
        print(f"qwenjax: {e}" if str(e) else "qwenjax: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
