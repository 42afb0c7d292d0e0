"""Model configuration: Hugging Face `Qwen2Config` field names, validated at construction, plus presets.

The config is a frozen, hashable dataclass so that jitted functions can take it as a static argument and
compiled steps are shared between runs of equal shape. Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

from qwenjax.errors import UserError, did_you_mean, read_document

DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "yarn", "linear")
#: `model.scan_layers: null` scans the layers from this depth on (docs/benchmarks.md, "Layers under scan")
SCAN_MIN_LAYERS = 8
#: fields that say how to run the model, not what it is: never written to HF's config.json or model_config.json
RUNTIME_FIELDS = ("scan_layers", "remat")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Qwen2 / Qwen2.5 dense decoder. Field names and meanings follow HF `Qwen2Config`."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (as every Qwen2.5 config)
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # stored as sorted items so the config stays hashable
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    initializer_range: float = 0.02  # std of the normal init of every matrix, as HF
    dtype: str = "float32"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"  # storage dtype of the parameters (float32 master weights for training)
    # None: a causal LM (HF Qwen2ForCausalLM). n: a sequence classifier (HF Qwen2ForSequenceClassification):
    # a `score` [hidden, n] head instead of the lm_head; a reward model has n = 1 (train.objective reward)
    num_labels: int | None = None
    # HF's `dual_chunk_attention_config` (Qwen2.5-1M): chunk_size, local_size, original_max_position_embeddings;
    # None: plain attention. Sorted items, as rope_scaling. Inference only (qwenjax/dca.py).
    dual_chunk_attention_config: tuple[tuple[str, Any], ...] | None = None
    # Runtime layout and memory choices (RUNTIME_FIELDS), not part of the checkpoint:
    scan_layers: bool | None = None  # layers stacked on a leading axis under lax.scan; None: from SCAN_MIN_LAYERS
    remat: str = "none"  # the layer body's jax.checkpoint policy (set from train.remat, validated there)

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        elif self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(sorted(tuple(kv) for kv in self.rope_scaling)))
        if self.dual_chunk_attention_config is not None:
            object.__setattr__(self, "dual_chunk_attention_config", _dca_items(self.dual_chunk_attention_config))
            if self.use_sliding_window:
                raise UserError("model.dual_chunk_attention_config cannot be combined with use_sliding_window")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model.{name} must be a positive integer, got {value!r}")
        if self.num_labels is not None and (not isinstance(self.num_labels, int) or self.num_labels <= 0):
            raise UserError(f"model.num_labels must be a positive integer or null, got {self.num_labels!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise UserError(f"model.head_dim must be a positive integer or null, got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_attention_heads "
                f"({self.num_attention_heads}) unless model.head_dim is given")
        if self.resolved_head_dim % 2:
            raise UserError(f"head_dim must be even for rotary embeddings, got {self.resolved_head_dim}")
        if not self.rope_theta > 0:
            raise UserError(f"model.rope_theta must be positive, got {self.rope_theta!r}")
        if not 0 < self.rms_norm_eps < 1:
            raise UserError(f"model.rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        if not self.initializer_range > 0:
            raise UserError(f"model.initializer_range must be positive, got {self.initializer_range!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(f"model.{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.use_sliding_window and (not self.sliding_window or self.sliding_window <= 0):
            raise UserError("model.sliding_window must be a positive integer when use_sliding_window is true")
        if self.scan_layers not in (None, True, False):
            raise UserError(f"model.scan_layers must be true, false or null, got {self.scan_layers!r}")
        if self.scan_layers and not self.uniform_layers:
            raise UserError(f"model.scan_layers: true needs every layer alike, but only layers >= "
                            f"max_window_layers ({self.max_window_layers}) use the sliding window; "
                            "set model.scan_layers: false")
        scaling = self.rope_scaling_dict
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise UserError(f"model.rope_scaling type {kind!r} is not supported "
                                f"(supported: {', '.join(ROPE_TYPES)})")
            if kind != "default" and not float(scaling.get("factor", 0)) > 0:
                raise UserError(f"model.rope_scaling.factor must be positive for {kind} scaling")

    # Derived quantities -------------------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def dca_dict(self) -> dict[str, Any] | None:
        """The dual chunk attention settings as a dict (HF `dual_chunk_attention_config`), or None."""
        return dict(self.dual_chunk_attention_config) if self.dual_chunk_attention_config is not None else None

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    def uses_sliding_window(self, layer: int) -> bool:
        """HF's rule: with the window enabled, layers at index >= max_window_layers use it."""
        return bool(self.use_sliding_window) and layer >= self.max_window_layers

    @property
    def uniform_layers(self) -> bool:
        """Whether every layer has the same attention window (what running them under one scan needs)."""
        return len({self.uses_sliding_window(i) for i in (0, self.num_hidden_layers - 1)}) == 1

    @property
    def scanned(self) -> bool:
        """The parameter layout: layers stacked on a leading axis and run under lax.scan, or a dict by index."""
        if self.scan_layers is not None:
            return self.scan_layers
        return self.num_hidden_layers >= SCAN_MIN_LAYERS and self.uniform_layers

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Hugging Face config.json -------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("dtype", "param_dtype", "num_labels", *RUNTIME_FIELDS):
            d.pop(name)
        d["rope_scaling"] = self.rope_scaling_dict
        d["dual_chunk_attention_config"] = self.dca_dict
        if d["dual_chunk_attention_config"] is None:
            d.pop("dual_chunk_attention_config")
        d["head_dim"] = self.resolved_head_dim
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu", attention_dropout=0.0,
                 torch_dtype=self.param_dtype, use_cache=True)
        if self.num_labels is not None:
            d.update(architectures=["Qwen2ForSequenceClassification"], num_labels=self.num_labels)
        return d

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides) -> ModelConfig:
        """Build from a HF `config.json` dict; keys that are not model fields (ids, dtype, ...) are ignored."""
        model_type = d.get("model_type")
        if model_type != "qwen2":
            raise UserError(f"unsupported model_type {model_type!r}: qwenjax loads Qwen2/Qwen2.5 ('qwen2') checkpoints")
        if d.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported hidden_act {d['hidden_act']!r}: Qwen2 uses 'silu'")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "num_labels", *RUNTIME_FIELDS}
        kwargs = {k: v for k, v in d.items() if k in names}
        if any(str(a).endswith("ForSequenceClassification") for a in d.get("architectures") or ()):
            # transformers writes id2label (num_labels is derived from it); 2 is its default
            kwargs["num_labels"] = int(d.get("num_labels") or len(d.get("id2label") or {}) or 2)
        rope = d.get("rope_parameters")  # the newest HF layout keeps theta and scaling together
        if isinstance(rope, Mapping):
            kwargs.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            if kwargs.get("rope_scaling") is None:
                kwargs["rope_scaling"] = dict(rope)
        scaling = kwargs.get("rope_scaling")
        if isinstance(scaling, Mapping):
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            is_default = scaling.get("rope_type", scaling.get("type", "default")) == "default"
            kwargs["rope_scaling"] = None if is_default else scaling
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)
        if not d.get("use_sliding_window", False):
            kwargs.pop("sliding_window", None)
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise UserError(f"config.json: {e}") from None


def _dca_items(value) -> tuple[tuple[str, Any], ...]:
    """Validated `dual_chunk_attention_config` items: chunk_size > local_size >= 0 (the chunk_len
    chunk_size - local_size must be positive), original_max_position_embeddings optional. vLLM's sparse prefill
    keys (`sparse_attention_*`) are dropped: not implemented, and their values are not hashable."""
    items = dict(value) if isinstance(value, Mapping) else dict(tuple(kv) for kv in value)
    items = {k: v for k, v in items.items() if not str(k).startswith("sparse_attention")}
    for name in ("chunk_size", "local_size", "original_max_position_embeddings"):
        v = items.get(name)
        if name != "original_max_position_embeddings" and v is None:
            raise UserError(f"model.dual_chunk_attention_config.{name} is required")
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (name == "chunk_size")):
            raise UserError(f"model.dual_chunk_attention_config.{name} must be a non-negative integer, got {v!r}")
    if items["local_size"] >= items["chunk_size"]:
        raise UserError(f"model.dual_chunk_attention_config: local_size ({items['local_size']}) must be smaller "
                        f"than chunk_size ({items['chunk_size']})")
    return tuple(sorted(items.items()))


#: the fields a preset fixes (its shape and the numbers of the released config.json files): a sweep entry that
#: names a preset resets these in its base config, so the base's tiny shape cannot override the preset's
PRESET_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                 "tie_word_embeddings", "max_window_layers")


def _preset(h, i, layers, heads, kv, vocab, tie, eps=1e-6, max_pos=32768) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie,
                       rms_norm_eps=eps, max_position_embeddings=max_pos, max_window_layers=layers)


# The seven official Qwen2.5 dense sizes (base models; shapes from the released config.json files).
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": _preset(896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": _preset(1536, 8960, 28, 12, 2, 151936, True, max_pos=131072),
    "qwen2.5-3b": _preset(2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b": _preset(3584, 18944, 28, 28, 4, 152064, False, max_pos=131072),
    "qwen2.5-14b": _preset(5120, 13824, 48, 40, 8, 152064, False, eps=1e-5, max_pos=131072),
    "qwen2.5-32b": _preset(5120, 27648, 64, 40, 8, 152064, False, eps=1e-5, max_pos=131072),
    "qwen2.5-72b": _preset(8192, 29568, 80, 64, 8, 152064, False, eps=1e-5, max_pos=131072),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset by name (`qwen2.5-7b`), optionally with fields replaced."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}{did_you_mean(name, PRESETS, list_known=True, cutoff=0.6)}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def load_hf_config(path) -> ModelConfig:
    """Read a HF `config.json` (file or checkpoint directory) with one clear error per problem."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "config.json"
    d = read_document(p, json.loads, (json.JSONDecodeError,), missing="no config.json at {path}",
                      malformed="malformed config.json at {path}: {reason}")
    if not isinstance(d, dict):
        raise UserError(f"malformed config.json at {p}: expected a JSON object")
    return ModelConfig.from_hf_dict(d)


def param_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameter counts, from the shapes alone: equal to `qwenjax.model.count_params`
    (tested over every preset), but without JAX, so `qwenjax.scaling` can take N from a preset.

    Per layer: q/k/v projections with biases, o_proj without, the gated MLP and two RMSNorm weights;
    non-embedding adds the final norm; total adds the embedding and, when untied, the lm_head.
    """
    h, hd = config.hidden_size, config.resolved_head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    attention = (h + 1) * (q + 2 * kv) + q * h
    per_layer = attention + 3 * h * config.intermediate_size + 2 * h
    non_embedding = config.num_hidden_layers * per_layer + h
    if config.num_labels:  # a sequence classifier: the score head replaces the lm_head
        return non_embedding + config.vocab_size * h + h * config.num_labels, non_embedding
    embedding = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return non_embedding + embedding, non_embedding


def flops_per_token(config: ModelConfig, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token: 2 x every matmul weight (projections, MLP, unembedding) plus attention.

    Attention convention: causal, counting only the unmasked half, so a token at position t attends to t+1
    keys and the average context is (seq_len + 1) / 2; QK^T and AV cost 2 x 2 x heads x head_dim x context.
    The embedding lookup is free. Training = 3 x forward (backward = 2 x forward). One definition for MFU,
    the sweep's compute axis and C in the loss law.
    """
    h, hd = config.hidden_size, config.resolved_head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    matmul_params = config.num_hidden_layers * per_layer + h * (config.num_labels or config.vocab_size)
    context = (seq_len + 1) / 2
    if config.use_sliding_window and config.sliding_window:
        window_layers = sum(config.uses_sliding_window(i) for i in range(config.num_hidden_layers))
        full_layers = config.num_hidden_layers - window_layers
        attn_ctx = full_layers * context + window_layers * min(context, config.sliding_window)
    else:
        attn_ctx = config.num_hidden_layers * context
    forward = 2 * matmul_params + 4 * config.num_attention_heads * hd * attn_ctx
    return 3 * forward if training else forward
