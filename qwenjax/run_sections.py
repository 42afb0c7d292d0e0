"""The sections of a run config (`model`, `train`, `optim`, ...): typed defaults, each validated on construction.

Split from `qwenjax.run_config` (which assembles them into `RunConfig` and loads YAML and overrides) so that each
file holds one concept; `qwenjax.run_config` re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from qwenjax.errors import UserError, did_you_mean
from qwenjax.run_stages import parse_length_mix

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "1-sqrt")
ATTENTION_IMPLS = ("auto", "reference", "blockwise", "flash", "cudnn", "splash", "sparse")  # auto + attention.KERNELS
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "offload")  # none + qwenjax.model's
OBJECTIVE_NAMES = ("next_token", "sft", "dpo", "reward")  # = qwenjax.train.objectives.OBJECTIVES (tests/test_sft.py)
DPO_LOSSES = ("sigmoid", "ipo")  # = qwenjax.train.dpo.LOSSES
DPO_REFERENCES = ("step", "cached")  # = qwenjax.train.dpo.REFERENCES
DATA_FORMATS = ("auto", "text", "chat")  # auto: chat for train.objective sft or JSONL with "messages"


# Defaults are the design doc's sweep defaults (AdamW 0.9/0.95/1e-8, wd 0.1, clip 1.0).


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """`preset` (e.g. `qwen2.5-0.5b`) and/or any `ModelConfig` field; None = from the preset, else the
    ModelConfig default. `vocab_size` None without a preset = the tokenizer's vocabulary size.
    `init_from`: a previous stage to start from instead of a fresh init: a run dir or a model dir (model_io)."""

    preset: str | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    dual_chunk_attention_config: dict[str, Any] | None = None  # inference only (qwenjax/dca.py)
    rms_norm_eps: float | None = None
    tie_word_embeddings: bool | None = None
    use_sliding_window: bool | None = None
    sliding_window: int | None = None
    max_window_layers: int | None = None
    initializer_range: float | None = None
    dtype: str | None = None  # compute dtype; None = auto: bfloat16 on GPU/TPU, float32 on CPU (train.setup)
    param_dtype: str | None = None
    scan_layers: bool | None = None  # layers under lax.scan (stacked params); None: from the depth (config.py)
    init_from: str | None = None

    def __post_init__(self):
        if self.dtype == "auto":  # the same as unset; a run resolves it per platform before saving its config
            object.__setattr__(self, "dtype", None)


_WANDB_WORDS = {"auto": "auto", "true": "true", "1": "true", "yes": "true", "on": "true",
                "false": "false", "0": "false", "no": "false", "off": "false"}


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 1000
    tokens: float | None = None  # planned D: sets steps = tokens / (batch_size x seq_len) (run_config.load_config)
    batch_size: int = 32  # global, in sequences
    seq_len: int = 512
    grad_accum: int = 1  # micro-batches per step (each batch_size // grad_accum sequences)
    log_every: int = 10
    divergence_factor: float = 2.0  # loss above this multiple of the first step's loss = diverged
    resume_optimizer: bool = False  # with model.init_from a run dir: keep its Adam state (qwenjax.train.start)
    wandb: str = "auto"  # log to wandb: auto (if QWENJAX_WANDB=1), true (needs wandb installed) or false
    remat: str = "none"  # activation rematerialisation of the layer body: none | full | dots | ... (REMAT_POLICIES)
    objective: str = "next_token"  # what is minimised: next_token | sft (next-token loss on assistant tokens)

    def __post_init__(self):
        if self.objective not in OBJECTIVE_NAMES:
            raise UserError(f"train.objective must be one of {', '.join(OBJECTIVE_NAMES)}, got {self.objective!r}"
                            + did_you_mean(str(self.objective), OBJECTIVE_NAMES))
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"train.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}"
                            + did_you_mean(str(self.remat), REMAT_POLICIES))
        wandb = _WANDB_WORDS.get(str(self.wandb).strip().lower())  # YAML's true arrives as "True"
        if wandb is None:
            raise UserError(f"train.wandb must be auto, true or false, got {self.wandb!r}")
        object.__setattr__(self, "wandb", wandb)
        positive("train.steps", self.steps)
        if self.tokens is not None and not (isinstance(self.tokens, int | float) and 1 <= self.tokens < float("inf")):
            raise UserError(f"train.tokens must be a positive number of tokens, got {self.tokens!r}")
        positive("train.batch_size", self.batch_size)
        positive("train.seq_len", self.seq_len)
        positive("train.grad_accum", self.grad_accum)
        positive("train.log_every", self.log_every)
        if not self.divergence_factor > 1:
            raise UserError(f"train.divergence_factor must be > 1, got {self.divergence_factor!r}")
        if self.batch_size % self.grad_accum:
            raise UserError(f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum "
                            f"({self.grad_accum})")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4  # peak learning rate
    schedule: str = "cosine"  # cosine | wsd | constant (after linear warmup)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio x lr
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays to the floor
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt (Hägele et al. 2024)
    weight_decay: float = 0.1  # decoupled (AdamW): param -= lr x wd x param
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 = off
    z_loss: float = 0.0  # coefficient of logsumexp(logits)^2
    decay_embeddings: bool = False  # norms and biases are never decayed

    def __post_init__(self):
        if not self.lr > 0:
            raise UserError(f"optim.lr must be positive, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
                            + did_you_mean(self.schedule, SCHEDULES))
        if self.decay_shape not in DECAY_SHAPES:
            raise UserError(f"optim.decay_shape must be one of {', '.join(DECAY_SHAPES)}, got "
                            f"{self.decay_shape!r}" + did_you_mean(self.decay_shape, DECAY_SHAPES))
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        for name in ("min_lr_ratio", "decay_fraction", "b1", "b2"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise UserError(f"optim.{name} must be in [0, 1], got {value!r}")
        for name in ("weight_decay", "clip_norm", "z_loss"):
            if getattr(self, name) < 0:
                raise UserError(f"optim.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.eps > 0:
            raise UserError(f"optim.eps must be positive, got {self.eps!r}")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh sizes; -1 (at most one of data, fsdp, tensor) = all remaining devices. `context` splits
    each sequence along its length (context parallelism, docs/long-context.md); it must divide train.seq_len."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, value in sizes.items():
            if value == 0 or value < -1:
                raise UserError(f"mesh.{name} must be a positive integer or -1 (= the rest), got {value!r}")
        if list(sizes.values()).count(-1) > 1:
            raise UserError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        positive("mesh.context", self.context)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 1000  # 0 = only at the end
    keep: int = 2
    enabled: bool = True  # false: no checkpoints at all (the run cannot resume)

    def __post_init__(self):
        if self.every_steps < 0:
            raise UserError(f"checkpoint.every_steps must be >= 0, got {self.every_steps!r}")
        positive("checkpoint.keep", self.keep)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    path: str = ""
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataSection:
    """`path` (a file, glob or folder; None = the Python standard library) or `sources` (weighted mix)."""

    path: str | None = None
    sources: list[SourceSpec] | None = None
    tokenizer: str | None = None  # a sentencepiece .model (or HF tokenizer dir); None = train one
    vocab_size: int = 2048  # of the tokenizer trained when `tokenizer` is None
    cache_dir: str | None = None  # None = $QWENJAX_CACHE or ~/.cache/qwenjax
    heldout_fraction: float = 0.01
    max_bytes: int | None = None  # read at most this many bytes of the corpus
    format: str = "auto"  # text | chat (JSONL {"messages": [...]}, docs/post-training.md) | auto
    truncate: bool = False  # chat: cut conversations longer than train.seq_len + 1 tokens instead of an error
    length_mix: Any = None  # {full, short, short_len}: rows with documents cut short (qwenjax.run_stages)

    def __post_init__(self):
        object.__setattr__(self, "length_mix", parse_length_mix(self.length_mix))
        if self.format not in DATA_FORMATS:
            raise UserError(f"data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}"
                            + did_you_mean(str(self.format), DATA_FORMATS))
        if self.sources is not None:
            object.__setattr__(self, "sources", tuple(
                s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in self.sources))
            if not self.sources:
                raise UserError("data.sources must not be empty (or leave it null and use data.path)")
            if self.path is not None:
                raise UserError("give data.path or data.sources, not both")
            for i, s in enumerate(self.sources):
                if not s.path:
                    raise UserError(f"data.sources[{i}].path is empty")
                if not s.weight > 0:
                    raise UserError(f"data.sources[{i}].weight must be positive, got {s.weight!r}")
        positive("data.vocab_size", self.vocab_size)
        if not 0 < self.heldout_fraction < 1:
            raise UserError(f"data.heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        if self.max_bytes is not None:
            positive("data.max_bytes", self.max_bytes)

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("QWENJAX_CACHE") or Path.home() / ".cache" / "qwenjax").expanduser()

    def weighted_paths(self) -> list[tuple[str | None, float]]:
        """[(path, weight)]; a single `path` (or the default corpus, None) has weight 1."""
        if self.sources:
            return [(s.path, float(s.weight)) for s in self.sources]
        return [(self.path, 1.0)]


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every_steps: int = 0  # 0 = only at the end
    batches: int = 8  # held-out batches of train.batch_size sequences (when `sequences` is 0)
    # > 0: evaluate on this many held-out sequences whatever the batch size, so runs of one sweep that differ
    # in batch size are judged on the same text (rounded up to whole eval batches)
    sequences: int = 0

    def __post_init__(self):
        if self.every_steps < 0:
            raise UserError(f"eval.every_steps must be >= 0, got {self.every_steps!r}")
        positive("eval.batches", self.batches)
        if self.sequences < 0:
            raise UserError(f"eval.sequences must be >= 0, got {self.sequences!r}")

    def num_batches(self, batch_size: int) -> int:
        """Eval batches of `batch_size` sequences: `batches`, or enough to cover `sequences`."""
        return -(-self.sequences // batch_size) if self.sequences else self.batches


@dataclasses.dataclass(frozen=True)
class AttentionSection:
    """The attention kernel (qwenjax.attention): a property of the run, not of the checkpoint, so it never
    reaches ModelConfig or config.json. auto = cudnn on GPU, splash on TPU, blockwise on CPU."""

    impl: str = "auto"
    # impl=sparse (qwenjax.attention_sparse, MInference's vertical + slash prefill): key columns and diagonals
    # kept (counts >= 1, or fractions of the keys in (0, 1)), queries that pick them, forced sink columns
    # and local diagonals (MInference's defaults)
    sparse_vertical: float = 1000
    sparse_slash: float = 6096
    sparse_last_q: int = 64
    sparse_sink: int = 30
    sparse_local: int = 100

    def __post_init__(self):
        if self.impl not in ATTENTION_IMPLS:
            raise UserError(f"attention.impl must be one of {', '.join(ATTENTION_IMPLS)}, got {self.impl!r}"
                            + did_you_mean(self.impl, ATTENTION_IMPLS))
        check_sparse_budgets(self.sparse_vertical, self.sparse_slash, self.sparse_last_q, self.sparse_sink,
                             self.sparse_local, prefix="attention.sparse_")

    @property
    def kernel(self) -> str:
        """The kernel name to pass as `attention_impl`: `impl`, or for sparse the name carrying its budgets."""
        if self.impl != "sparse":
            return self.impl
        return ("sparse:" + f"vertical={self.sparse_vertical:g},slash={self.sparse_slash:g},"
                f"last_q={self.sparse_last_q},sink={self.sparse_sink},local={self.sparse_local}")


def check_sparse_budgets(vertical, slash, last_q, sink, local, prefix: str = "") -> None:
    """UserError unless vertical and slash are counts >= 1 or fractions in (0, 1), last_q and local >= 1 and
    sink >= 0 (local >= 1 keeps each query's own key, so no query is left without one)."""
    for key, value in (("vertical", vertical), ("slash", slash)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                0 < value < 1 or (value >= 1 and value == int(value))):
            raise UserError(f"{prefix}{key} must be a count >= 1 or a fraction of the keys in (0, 1), got {value!r}")
    for key, value, low in (("last_q", last_q, 1), ("sink", sink, 0), ("local", local, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{prefix}{key} must be an integer >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DPOSection:
    """train.objective dpo (qwenjax.train.dpo, docs/post-training.md): beta scales the implicit reward,
    loss is sigmoid (DPO) or ipo, label_smoothing (sigmoid only) the assumed fraction of flipped labels."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "step"  # step: the frozen reference runs in each step; cached: its log-probs computed once

    def __post_init__(self):
        if self.reference not in DPO_REFERENCES:
            raise UserError(f"dpo.reference must be one of {', '.join(DPO_REFERENCES)}, got {self.reference!r}"
                            + did_you_mean(str(self.reference), DPO_REFERENCES))
        if self.loss not in DPO_LOSSES:
            raise UserError(f"dpo.loss must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}"
                            + did_you_mean(str(self.loss), DPO_LOSSES))
        if isinstance(self.beta, bool) or not isinstance(self.beta, int | float) or not 0 < self.beta < float("inf"):
            raise UserError(f"dpo.beta must be a positive number, got {self.beta!r}")
        eps = self.label_smoothing
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < 0.5:
            raise UserError(f"dpo.label_smoothing must be in [0, 0.5), got {eps!r}")


RL_VERIFIERS = ("auto", "answer", "tests", "reward_model")  # = qwenjax.post.rl_verify.VERIFIERS


@dataclasses.dataclass(frozen=True)
class RLSection:
    """`qwenjax rl` (GRPO, qwenjax.post.grpo, docs/post-training.md "GRPO"): G = group_size answers sampled per
    prompt, scored by `verifier`, trained with a clipped policy gradient and a k3 KL penalty (kl_beta) to the
    frozen starting model."""

    prompts: str = ""  # JSONL: prompt + answer, or prompt + tests (as `qwenjax pairs` reads)
    group_size: int = 8  # G answers per prompt, one batched decode
    prompts_per_step: int = 4  # the step's batch is prompts_per_step x group_size sequences
    clip_eps: float = 0.2  # PPO ratio clip
    kl_beta: float = 0.04  # k3 KL penalty coefficient
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    verifier: str = "auto"  # auto (answer or tests per prompt) | answer | tests | reward_model
    reward_model: str = ""  # a model dir with num_labels 1 (train.objective reward), for verifier reward_model
    timeout_s: float = 10.0  # sandbox limits for tests
    memory_mb: int = 1024

    def __post_init__(self):
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2:
            raise UserError(f"rl.group_size must be an integer >= 2 (advantages compare answers within a group), "
                            f"got {g!r}")
        for key in ("prompts_per_step", "max_new_tokens", "memory_mb"):
            positive(f"rl.{key}", getattr(self, key))
        if self.verifier not in RL_VERIFIERS:
            raise UserError(f"rl.verifier must be one of {', '.join(RL_VERIFIERS)}, got {self.verifier!r}"
                            + did_you_mean(str(self.verifier), RL_VERIFIERS))
        if self.verifier == "reward_model" and not self.reward_model:
            raise UserError("rl.verifier reward_model needs rl.reward_model (a model dir trained with "
                            "train.objective reward)")
        checks = (("clip_eps", 0 < self.clip_eps < 1, "in (0, 1)"), ("kl_beta", self.kl_beta >= 0, ">= 0"),
                  ("temperature", self.temperature > 0, "> 0"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("timeout_s", self.timeout_s > 0, "> 0"))
        for key, ok, rule in checks:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok:
                raise UserError(f"rl.{key} must be {rule}, got {value!r}")


def positive(key: str, value) -> None:
    """UserError unless `value` is an int >= 1 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key} must be a positive integer, got {value!r}")
