"""dpo.reference cached: the frozen reference's per-token log-probs of every training pair, computed once
before training and stored beside the pair cache (`<pair cache>/ref-<key>.npz`), so each DPO step runs only
the policy and the train state holds no second copy of the parameters.

The key covers what the values depend on: the pairs and tokenizer (the pair cache's key), the reference
(`model.init_from`'s resolved path and newest file time, or the seed of a fresh init), the model config
(compute dtype included), `train.seq_len`, `data.truncate` and `attention.impl`. One process only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from qwenjax.errors import UserError
from qwenjax.model_io import config_to_dict
from qwenjax.run_config import RunConfig
from qwenjax.train.dpo import SIDES, token_logps

log = logging.getLogger(__name__)


def reference_key(cfg: RunConfig, model_cfg, pairs) -> str:
    source = None
    if cfg.model.init_from:
        root = Path(cfg.model.init_from).expanduser().resolve()
        newest = max((f.stat().st_mtime_ns for f in root.rglob("*") if f.is_file()), default=0)
        source = [str(root), newest]
    parts = [pairs.key, source, None if source else cfg.seed, config_to_dict(model_cfg), cfg.train.seq_len,
             bool(cfg.data.truncate), cfg.attention.kernel, model_cfg.dtype]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def attach_cached_reference(cfg: RunConfig, model_cfg, pairs, params_fn: Callable[[], object]) -> Path:
    """Load (or compute with `params_fn()`, the reference params, then save) the training pairs' reference
    log-probs and attach them to `pairs`; returns the file."""
    if jax.process_count() > 1:
        raise UserError("dpo.reference cached runs on one process; use dpo.reference: step on several hosts")
    path = pairs.folder / f"ref-{reference_key(cfg, model_cfg, pairs)}.npz"
    if not path.is_file():
        logps = compute_reference(params_fn(), model_cfg, pairs, cfg.train.seq_len,
                                  max(1, cfg.train.batch_size // cfg.train.grad_accum), cfg.attention.kernel)
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, **logps)
        os.replace(tmp, path)
        log.info("reference log-probs of %d training pairs cached in %s", pairs.num("train"), path)
    with np.load(path) as f:
        pairs.attach_reference("train", {side: f[side] for side in SIDES})
    return path


def compute_reference(params, model_cfg, pairs, seq_len: int, batch_size: int, attention_impl: str = "auto"):
    """{side: log p(ids[j] | ids[:j]) per id of the training split} (entry 0 of each pair, and tokens cut by
    seq_len, are 0: no target reads them)."""
    fn = jax.jit(functools.partial(token_logps, model_cfg=model_cfg, attention_impl=attention_impl))
    n = pairs.num("train")
    out = {side: np.zeros(pairs.token_count("train", side), np.float32) for side in SIDES}
    offsets = {side: pairs.offsets("train", side) for side in SIDES}
    for start in range(0, n, batch_size):
        idx = [i if i < n else None for i in range(start, start + batch_size)]
        batch = pairs.rows_batch("train", idx, seq_len)
        for side in SIDES:
            logp_BT = np.asarray(fn(params, batch[f"{side}_inputs"], batch[f"{side}_targets"]))
            for r, i in enumerate(idx):
                if i is not None:
                    lo, m = offsets[side][i], min(offsets[side][i + 1] - offsets[side][i] - 1, seq_len)
                    out[side][lo + 1:lo + m + 1] = logp_BT[r, :m]
    return out
