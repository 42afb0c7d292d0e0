"""qwenjax: Qwen2.5 in JAX/Flax, with learning-rate x batch-size scaling-law sweeps and a fitter.

The public names are imported lazily so that light modules (data, scaling) load without JAX.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "qwenjax.config", "PRESETS": "qwenjax.config", "preset": "qwenjax.config",
    "flops_per_token": "qwenjax.config",
    "init_params": "qwenjax.model", "abstract_params": "qwenjax.model", "apply": "qwenjax.model",
    "logits": "qwenjax.model", "count_params": "qwenjax.model",
    "load_hf": "qwenjax.hf", "save_hf": "qwenjax.hf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwenjax' has no attribute {name!r}")
