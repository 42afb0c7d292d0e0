"""qwenjax: Qwen2.5 in JAX/Flax, with learning-rate x batch-size scaling-law sweeps and a fitter."""

from qwenjax.config import PRESETS, ModelConfig, flops_per_token, preset
from qwenjax.model import abstract_params, apply, count_params, init_params, logits

__all__ = ["PRESETS", "ModelConfig", "abstract_params", "apply", "count_params", "flops_per_token",
           "init_params", "logits", "preset", "load_hf", "save_hf"]


def __getattr__(name):  # HF import/export loads safetensors lazily
    if name in ("load_hf", "save_hf"):
        from qwenjax import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'qwenjax' has no attribute {name!r}")
