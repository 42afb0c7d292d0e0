"""Compiled functions, cached per process, and JAX's persistent compilation cache.

Why: runs of equal shapes (a sweep in one process, the tests, a population probe followed by its run)
compile each executable once per process; the persistent cache under the data cache directory covers
separate processes. Keys hold everything that changes the program (configs are frozen dataclasses).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

_COMPILED: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
_COMPILED_MAX = 24  # executables kept (a sweep in one process visits a few shapes many times)


def cached(key: tuple, build: Callable[[], Any]) -> tuple[Any, float]:
    """(the value cached under `key`, else `build()`'s, seconds spent building now: 0 when cached)."""
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    value = build()
    _COMPILED[key] = value
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return value, time.perf_counter() - t0


def setup_compilation_cache(cache_root: Path) -> None:
    """Use `<cache_root>/jax` as JAX's persistent cache, unless QWENJAX_COMPILATION_CACHE=0 or one is set."""
    if os.environ.get("QWENJAX_COMPILATION_CACHE", "1").lower() in ("0", "false", "no"):
        return
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root / "jax"))
