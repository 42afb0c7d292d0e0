"""Compiled functions, cached per process, and JAX's persistent compilation cache.

Runs of equal shapes (a sweep in one process, the tests) compile each executable once per process; the
persistent cache (under the data cache directory) covers separate processes."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import jax

_COMPILED: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
_COMPILED_MAX = 24  # executables kept (a sweep in one process visits a few shapes many times)


def _remember(key: tuple, value):
    _COMPILED[key] = value
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return value




def _setup_compilation_cache(cache_root: Path) -> None:
    if os.environ.get("QWENJAX_COMPILATION_CACHE", "1").lower() in ("0", "false", "no"):
        return
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root / "jax"))
