"""The run configuration: typed defaults, YAML (with `base:` inheritance), dotted `KEY=VALUE` overrides.

A run is described by one frozen `RunConfig`. `load_config` merges, in order: the typed defaults below,
the YAML chain (a YAML may say `base: other.yaml`, resolved relative to itself), then the overrides.
OmegaConf does the merge and the type conversion; every problem becomes one `UserError` line that names
the key (with a did-you-mean for unknown keys). Nothing here imports JAX, so the sweep planner and the
CLI can load and validate configs cheaply.

Units: `train.batch_size` is the GLOBAL batch in sequences; tokens of a run D = steps x batch_size x seq_len
(`planned_tokens`). `optim.lr` is the peak learning rate.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from qwenjax.config import ModelConfig, preset
from qwenjax.errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "1-sqrt")


# ---------------------------------------------------------------------------------------------------------
# Sections. Defaults are the design doc's sweep defaults (AdamW 0.9/0.95/1e-8, wd 0.1, clip 1.0).


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """`preset` (e.g. `qwen2.5-0.5b`) and/or any `ModelConfig` field; None = from the preset, else the
    ModelConfig default. `vocab_size` None without a preset = the tokenizer's vocabulary size.
    `init_from`: a params checkpoint directory (model_io format) to start from instead of a fresh init."""

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
    rms_norm_eps: float | None = None
    tie_word_embeddings: bool | None = None
    use_sliding_window: bool | None = None
    sliding_window: int | None = None
    max_window_layers: int | None = None
    initializer_range: float | None = None
    dtype: str | None = None
    param_dtype: str | None = None
    init_from: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 1000
    batch_size: int = 32  # global, in sequences
    seq_len: int = 512
    grad_accum: int = 1  # micro-batches per step (each batch_size // grad_accum sequences)
    log_every: int = 10
    divergence_factor: float = 2.0  # loss above this multiple of the first step's loss = diverged

    def __post_init__(self):
        _positive("train.steps", self.steps)
        _positive("train.batch_size", self.batch_size)
        _positive("train.seq_len", self.seq_len)
        _positive("train.grad_accum", self.grad_accum)
        _positive("train.log_every", self.log_every)
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
                            + _did_you_mean(self.schedule, SCHEDULES))
        if self.decay_shape not in DECAY_SHAPES:
            raise UserError(f"optim.decay_shape must be one of {', '.join(DECAY_SHAPES)}, got "
                            f"{self.decay_shape!r}" + _did_you_mean(self.decay_shape, DECAY_SHAPES))
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
    """Device mesh sizes; -1 (at most one axis) = all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, value in sizes.items():
            if value == 0 or value < -1:
                raise UserError(f"mesh.{name} must be a positive integer or -1 (= the rest), got {value!r}")
        if list(sizes.values()).count(-1) > 1:
            raise UserError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 1000  # 0 = only at the end
    keep: int = 2
    enabled: bool = True  # false: no checkpoints at all (the run cannot resume)

    def __post_init__(self):
        if self.every_steps < 0:
            raise UserError(f"checkpoint.every_steps must be >= 0, got {self.every_steps!r}")
        _positive("checkpoint.keep", self.keep)


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

    def __post_init__(self):
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
        _positive("data.vocab_size", self.vocab_size)
        if not 0 < self.heldout_fraction < 1:
            raise UserError(f"data.heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        if self.max_bytes is not None:
            _positive("data.max_bytes", self.max_bytes)

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
        _positive("eval.batches", self.batches)
        if self.sequences < 0:
            raise UserError(f"eval.sequences must be >= 0, got {self.sequences!r}")

    def num_batches(self, batch_size: int) -> int:
        """Eval batches of `batch_size` sequences: `batches`, or enough to cover `sequences`."""
        return -(-self.sequences // batch_size) if self.sequences else self.batches


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs. `hparams`: provenance of values set by `--hparams FIT.json`."""

    run_dir: str = ""  # "" = runs/<name of the YAML file> (resolved by load_config)
    seed: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    hparams: dict[str, Any] | None = None

    def __post_init__(self):
        mc = model_config(self, vocab_size=self.model.vocab_size or 1)  # vocab does not matter here
        if self.train.seq_len > mc.max_position_embeddings:
            raise UserError(f"train.seq_len ({self.train.seq_len}) exceeds model.max_position_embeddings "
                            f"({mc.max_position_embeddings})")
        dp = data_parallel_size(self.mesh)
        micro = self.train.batch_size // self.train.grad_accum
        if dp is not None and micro % dp:
            raise UserError(
                f"train.batch_size ({self.train.batch_size}) / train.grad_accum ({self.train.grad_accum}) = "
                f"{micro} sequences per micro-batch is not divisible by the data-parallel size "
                f"mesh.data x mesh.fsdp = {dp}")

    def replace(self, **changes) -> RunConfig:
        """A copy with top-level fields or dotted keys replaced: `cfg.replace(**{"optim.lr": 1e-3})`."""
        return _replace_dotted(self, changes)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _positive(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key} must be a positive integer, got {value!r}")


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def data_parallel_size(mesh: MeshSection) -> int | None:
    """mesh.data x mesh.fsdp (the axes the batch is split over), or None while one of them is -1."""
    if mesh.data == -1 or mesh.fsdp == -1:
        return None
    return mesh.data * mesh.fsdp


def all_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (`train.steps`, `model.hidden_size`, ...)."""
    cls = cls or RunConfig
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys += all_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


_OPEN_KEYS = ("hparams", "model.rope_scaling", "data.sources")  # free-form values below these keys


def _check_keys(tree: Mapping, where: str, prefix: str = "") -> None:
    """Unknown keys -> UserError with a did-you-mean over all dotted keys (OmegaConf's message lacks it)."""
    known = all_keys()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in _OPEN_KEYS:
            continue
        if dotted in known:
            continue
        if isinstance(value, Mapping) and any(k.startswith(dotted + ".") for k in known):
            _check_keys(value, where, dotted + ".")
            continue
        short = [k for k in known if k.rsplit(".", 1)[-1] == str(key)]
        hint = f" (did you mean {short[0]!r}?)" if short else _did_you_mean(dotted, known)
        raise UserError(f"unknown config key {dotted!r}{where}{hint}")


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _expected_type(dotted: str) -> str:
    cls: Any = RunConfig
    parts = dotted.split(".")
    for part in parts:
        hints = {f.name: f for f in dataclasses.fields(cls)}
        if part not in hints:
            return "a valid value"
        field = hints[part]
        if field.default_factory is not dataclasses.MISSING:
            cls = type(field.default_factory())
            continue
        tp = eval(field.type, globals()) if isinstance(field.type, str) else field.type  # noqa: S307
        args = [a for a in getattr(tp, "__args__", (tp,)) if a is not type(None)]
        word = _TYPE_WORDS.get(args[0]) if args else None
        if word is None:
            return "a " + ("mapping" if "dict" in str(tp) else "list" if "list" in str(tp) else "valid value")
        return word + (" or null" if len(args) < len(getattr(tp, "__args__", (tp,))) else "")
    return "a valid value"


def _user_error(e: OmegaConfBaseException, where: str) -> UserError:
    key = getattr(e, "full_key", "") or ""
    if isinstance(e, ConfigKeyError):
        return UserError(f"unknown config key {key!r}{where}" + _did_you_mean(key, all_keys()))
    if isinstance(e, ValidationError):
        value = getattr(e, "value", None)
        shown = f", got {value!r}" if value is not None else ""
        return UserError(f"{key} must be {_expected_type(key)}{shown}{where}")
    msg = str(e).splitlines()[0]
    return UserError(f"{key}: {msg}{where}" if key else f"{msg}{where}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The YAML as a dict with its `base:` chain merged underneath (child wins)."""
    path = path.expanduser()
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise UserError(f"config {path}: circular base chain")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise UserError(f"config {path} must be a mapping of keys, got {type(tree).__name__}")
    base = tree.pop("base", None)
    _check_keys(tree, f" in {path}")
    if base is None:
        return tree
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    merged = OmegaConf.merge(OmegaConf.create(_read_yaml(base_path, (*seen, path.resolve()))),
                             OmegaConf.create(tree))
    return OmegaConf.to_container(merged)


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any]) -> dict:
    """`["train.steps=5"]` or `{"train.steps": 5}` -> a nested dict (string values parsed as YAML)."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise UserError(f"override {item!r} must look like KEY=VALUE (e.g. train.steps=100)")
            key, text = item.split("=", 1)
            try:
                value = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError:
                value = text
            if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
                try:
                    value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
                except ValueError:
                    pass
            items.append((key.strip(), value))
    tree: dict = {}
    for key, value in items:
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override key {key!r} is not a dotted key like train.steps")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {key!r} conflicts with another override")
        node[leaf] = value
    return tree


def _build(cls, tree: Mapping):
    """Dataclass instance from a plain nested dict (validation runs in each __post_init__)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in tree:
            continue
        value = tree[f.name]
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            value = _build(type(f.default_factory()), value or {})
        kwargs[f.name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# Public API


def load_config(path: str | os.PathLike | None,
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> RunConfig:
    """Typed defaults <- YAML at `path` (and its `base:` chain) <- dotted overrides, validated.

    `overrides`: `["optim.lr=1e-3", "train.steps=100"]` (values parsed as YAML) or a mapping of dotted keys
    to Python values. Raises UserError with one line per problem.
    """
    schema = OmegaConf.structured(RunConfig)
    OmegaConf.set_readonly(schema, False)
    layers = []
    if path is not None:
        layers.append((_read_yaml(Path(path)), f" in {path}"))
    override_tree = parse_overrides(overrides)
    _check_keys(override_tree, " in the command-line overrides")
    layers.append((override_tree, " in the command-line overrides"))
    merged = schema
    for tree, where in layers:
        try:
            merged = OmegaConf.merge(merged, tree)
        except OmegaConfBaseException as e:
            raise _user_error(e, where) from None
        except TypeError as e:  # e.g. a list given where a mapping belongs
            raise UserError(f"invalid value{where}: {e}") from None
    tree = OmegaConf.to_container(merged)
    if not tree.get("run_dir"):
        tree["run_dir"] = str(Path("runs") / (Path(path).stem if path is not None else "run"))
    return _build(RunConfig, tree)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (JSON/YAML-safe: tuples become lists)."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, Mapping):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def config_from_dict(tree: Mapping[str, Any]) -> RunConfig:
    """Inverse of `config_to_dict` (validated the same way as `load_config`)."""
    _check_keys(tree, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), tree)
    except OmegaConfBaseException as e:
        raise _user_error(e, "") from None
    return _build(RunConfig, OmegaConf.to_container(merged))


def _replace_dotted(cfg: RunConfig, changes: Mapping[str, Any]) -> RunConfig:
    tree = config_to_dict(cfg)
    for key, value in changes.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = config_to_dict(value) if dataclasses.is_dataclass(value) else value
    return config_from_dict(tree)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temp file + rename): a kill never leaves half a file."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_config(cfg: RunConfig, *, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig of the run: preset (or ModelConfig defaults) with the non-null `model.*` fields on top.

    vocab_size, first that is given: `model.vocab_size`, the preset's, the `vocab_size` argument (the
    tokenizer's, passed by the trainer), the vocabulary of `data.tokenizer` (read from the file), then
    `data.vocab_size` (the size of the tokenizer the run will train).
    """
    m = cfg.model
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    changes = {name: getattr(m, name) for name in fields if getattr(m, name, None) is not None}
    if m.preset is None and "vocab_size" not in changes:
        changes["vocab_size"] = vocab_size or _tokenizer_vocab_size(cfg) or cfg.data.vocab_size
    if m.preset is None and "max_window_layers" not in changes:
        # ModelConfig's default (28) is the 0.5B's layer count; without a preset follow the model's depth.
        changes["max_window_layers"] = changes.get("num_hidden_layers", ModelConfig.num_hidden_layers)
    try:
        return preset(m.preset, **changes) if m.preset else ModelConfig(**changes)
    except TypeError as e:
        raise UserError(f"model: {e}") from None


def _tokenizer_vocab_size(cfg: RunConfig) -> int | None:
    if not cfg.data.tokenizer or cfg.data.tokenizer == MISSING:
        return None
    from qwenjax.data.tokenizer import load_tokenizer

    return int(load_tokenizer(cfg.data.tokenizer).vocab_size)


def planned_tokens(cfg: RunConfig) -> int:
    """D of the scaling laws: steps x global batch (sequences) x seq_len."""
    return cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir).expanduser()


MISSING = "???"


def missing_keys(cfg: RunConfig) -> list[str]:
    """Dotted keys still set to `???` (placeholders the user must fill in, e.g. data.tokenizer)."""
    out = []

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict) and f"{prefix}{k}" not in _OPEN_KEYS:
                walk(v, f"{prefix}{k}.")
            elif v == MISSING:
                out.append(f"{prefix}{k}")

    walk(config_to_dict(cfg), "")
    return out
