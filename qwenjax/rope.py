"""Rotary position embeddings as HF computes them: rotate-half (NeoX) layout, float32 angles.

Variants: default, linear, and YaRN with the current HF / vLLM semantics (correction range on
`original_max_position_embeddings`, explicit `factor` wins). Long-context variants (DCA positions) plug in here.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qwenjax.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_scaling(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies [head_dim/2] (float32, host constant) and the cos/sin scaling factor."""
    dim = config.resolved_head_dim
    base = np.float32(config.rope_theta)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pos_freqs = base**exponents
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    scaling = config.rope_scaling_dict or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    # YaRN
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    if scaling.get("attention_factor") is not None:
        attention_factor = float(scaling["attention_factor"])
    elif "mscale" in scaling and "mscale_all_dim" in scaling:
        attention_factor = _yarn_mscale(factor, scaling["mscale"]) / _yarn_mscale(factor, scaling["mscale_all_dim"])
    else:
        attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = np.float32(1) - ramp
    inv_interp = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_interp * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32), attention_factor


def rope_cos_sin(config: ModelConfig, positions_BT: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables [B, T, head_dim] for integer positions, computed in float32 then cast to `dtype`."""
    inv_freq, scale = inv_freq_and_scaling(config)
    freqs_BTK = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb_BTH = jnp.concatenate([freqs_BTK, freqs_BTK], axis=-1)
    return (jnp.cos(emb_BTH) * scale).astype(dtype), (jnp.sin(emb_BTH) * scale).astype(dtype)


def apply_rope(x_BTNH: jnp.ndarray, cos_BTH: jnp.ndarray, sin_BTH: jnp.ndarray) -> jnp.ndarray:
    """x * cos + rotate_half(x) * sin, where dimension j pairs with j + head_dim/2."""
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
