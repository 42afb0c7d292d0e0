"""The subcommands of `qwenjax` (one module each) and the checks they share before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

from qwenjax.errors import UserError


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path, or a UserError now if it cannot become a directory this process writes into:
    hours of training or sweeping must not end in a NotADirectoryError or a PermissionError."""
    path = Path(path).expanduser()
    try:
        if any(len(os.fsencode(part)) > 255 for part in path.parts):  # NAME_MAX; exists() just says False
            raise OSError("a name in it is longer than 255 bytes")
        existing = path
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent  # the nearest part of the path that is already there
        if existing == path and not path.is_dir():
            raise UserError(f"{what} {path} exists and is not a directory")
        if not existing.is_dir():
            raise UserError(f"{what} {path} cannot be created: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{what} {path} is not writable (no write permission on {existing})")
    except UserError:
        raise
    except (OSError, ValueError) as e:  # a name the filesystem refuses (NUL byte, too long, ...)
        raise UserError(f"{what} {str(path)!r} is not a usable path: {e}") from None
    return path
