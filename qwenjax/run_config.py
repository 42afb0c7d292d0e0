"""The run configuration: typed defaults, YAML (with `base:` inheritance), dotted `KEY=VALUE` overrides.

A run is described by one frozen `RunConfig`. `load_config` merges, in order: the typed defaults below,
the YAML chain (a YAML may say `base: other.yaml`, resolved relative to itself), then the overrides.
OmegaConf does the merge and the type conversion; every problem becomes one `UserError` line that names
the key (with a did-you-mean for unknown keys). Nothing here imports JAX, so the sweep planner and the
CLI can load and validate configs cheaply.

Units: `train.batch_size` is the GLOBAL batch in sequences; tokens of a run D = steps x batch_size x seq_len
(`planned_tokens`). `train.tokens` plans D instead: the steps become `steps_for_tokens(tokens, batch_size,
seq_len)`, recomputed whenever the batch changes. Give one of `train.steps` and `train.tokens`: the later layer
(a child YAML over its base, the command line over the YAML) decides; both in one layer must agree.
`optim.lr` is the peak learning rate.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from qwenjax.config import ModelConfig, preset
from qwenjax.errors import UserError, did_you_mean, read_document
from qwenjax.jsonl import atomic_write_text  # re-exported: callers import it from here too
from qwenjax.run_sections import (
    DECAY_SHAPES,
    SCHEDULES,
    AttentionSection,
    CheckpointSection,
    DataSection,
    DPOSection,
    EvalSection,
    MeshSection,
    ModelSection,
    OptimSection,
    RLSection,
    SourceSpec,
    TrainSection,
    positive,
)
from qwenjax.run_stages import parse_stages, stage_changes

__all__ = [
    "DECAY_SHAPES", "MISSING", "SCHEDULES", "CheckpointSection", "DataSection", "EvalSection", "MeshSection",
    "ModelSection", "OptimSection", "RunConfig", "SourceSpec", "TrainSection", "all_keys", "atomic_write_text",
    "config_from_dict", "config_to_dict", "data_parallel_size", "load_config", "missing_keys",
    "model_config", "parse_overrides", "planned_tokens", "positive", "run_dir", "save_config", "stage_config",
    "stage_dir", "steps_for_tokens",
]


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
    attention: AttentionSection = dataclasses.field(default_factory=AttentionSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    rl: RLSection = dataclasses.field(default_factory=RLSection)  # qwenjax rl (GRPO)
    hparams: dict[str, Any] | None = None
    stages: list[Any] | None = None  # staged training (qwenjax.run_stages, docs/long-context.md)

    def __post_init__(self):
        mc = model_config(self, vocab_size=self.model.vocab_size or 1)  # vocab does not matter here
        if self.train.seq_len > mc.max_position_embeddings:
            raise UserError(f"train.seq_len ({self.train.seq_len}) exceeds model.max_position_embeddings "
                            f"({mc.max_position_embeddings})")
        t = self.train
        if t.tokens is not None and t.steps != steps_for_tokens(t.tokens, t.batch_size, t.seq_len):
            raise UserError(_both_message(t.steps, t.tokens, ""))
        dp = data_parallel_size(self.mesh)
        micro = self.train.batch_size // self.train.grad_accum
        if dp is not None and micro % dp:
            raise UserError(
                f"train.batch_size ({self.train.batch_size}) / train.grad_accum ({self.train.grad_accum}) = "
                f"{micro} sequences per micro-batch is not divisible by the data-parallel size "
                f"mesh.data x mesh.fsdp = {dp}")
        if self.train.seq_len % self.mesh.context:
            raise UserError(f"train.seq_len ({self.train.seq_len}) is not divisible by mesh.context "
                            f"({self.mesh.context}): each device holds an equal slice of every sequence")
        if self.stages is not None:
            object.__setattr__(self, "stages", parse_stages(self.stages))
            if not self.checkpoint.enabled and len(self.stages) > 1:
                raise UserError("stages need checkpoint.enabled: true (each stage starts from the previous "
                                "stage's checkpoint)")
            for i in range(len(self.stages)):
                stage_config(self, i)  # every stage is a valid run config, checked now

    def replace(self, **changes) -> RunConfig:
        """A copy with top-level fields or dotted keys replaced: `cfg.replace(**{"optim.lr": 1e-3})`."""
        return _replace_dotted(self, changes)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def steps_for_tokens(tokens: float, batch_size: int, seq_len: int) -> int:
    """Steps that train `tokens` tokens in batches of `batch_size` sequences of `seq_len`: nearest, at least 1."""
    return max(1, round(tokens / (batch_size * seq_len)))


def _both_message(steps, tokens, where: str) -> str:
    return (f"train.steps ({steps}) and train.tokens ({tokens:g}) are both given{where} and disagree: give one "
            "of them (train.tokens sets train.steps = tokens / (batch_size x seq_len))")


def _step_plan(layers: Sequence[tuple[Mapping, str]]) -> tuple[str | None, str]:
    """Which of train.steps / train.tokens the last layer naming one of them gives: "steps", "tokens" or
    "both" (with that layer's description); both on the command line is an error."""
    plan, where = None, ""
    for tree, layer in layers:
        train = tree.get("train") if isinstance(tree, Mapping) else None
        if not isinstance(train, Mapping):
            continue
        has_steps, has_tokens = "steps" in train, train.get("tokens") is not None
        if has_steps and has_tokens and layer == _CLI:
            raise UserError("train.steps and train.tokens are both given in the command-line overrides: give "
                            "one of them (train.tokens sets train.steps = tokens / (batch_size x seq_len))")
        if has_steps or has_tokens or "tokens" in train:
            plan, where = ("both" if has_tokens and has_steps else "tokens" if has_tokens else "steps"), layer
    return plan, where


def _resolve_steps(tree: dict, plan: str | None, where: str) -> None:
    """Fill train.steps from train.tokens (plan "tokens"), drop tokens a later train.steps replaced."""
    train = tree.get("train") or {}
    tokens, batch, seq = train.get("tokens"), train.get("batch_size"), train.get("seq_len")
    if plan == "steps":
        train["tokens"] = None
        return
    valid = all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in (tokens, batch, seq))
    if plan is None or not valid or tokens == float("inf"):
        return  # nothing to resolve, or a bad value the sections report
    steps = steps_for_tokens(tokens, batch, seq)
    if plan == "both" and train.get("steps") != steps:
        raise UserError(_both_message(train.get("steps"), tokens, where))
    train["steps"] = steps


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


# free-form values below these keys
_OPEN_KEYS = ("hparams", "model.rope_scaling", "model.dual_chunk_attention_config", "data.sources")


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
        hint = f" (did you mean {short[0]!r}?)" if short else did_you_mean(dotted, known)
        raise UserError(f"unknown config key {dotted!r}{where}{hint}")


_CLI = " in the command-line overrides"
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
        namespace = vars(sys.modules[cls.__module__])  # the section's module (run_sections or this one)
        tp = eval(field.type, namespace) if isinstance(field.type, str) else field.type  # noqa: S307
        args = [a for a in getattr(tp, "__args__", (tp,)) if a is not type(None)]
        word = _TYPE_WORDS.get(args[0]) if args else None
        if word is None:
            return "a " + ("mapping" if "dict" in str(tp) else "list" if "list" in str(tp) else "valid value")
        return word + (" or null" if len(args) < len(getattr(tp, "__args__", (tp,))) else "")
    return "a valid value"


def _user_error(e: OmegaConfBaseException, where: str) -> UserError:
    key = getattr(e, "full_key", "") or ""
    if isinstance(e, ConfigKeyError):
        return UserError(f"unknown config key {key!r}{where}" + did_you_mean(key, all_keys()))
    if isinstance(e, ValidationError):
        value = getattr(e, "value", None)
        shown = f", got {value!r}" if value is not None else ""
        return UserError(f"{key} must be {_expected_type(key)}{shown}{where}")
    msg = str(e).splitlines()[0]
    return UserError(f"{key}: {msg}{where}" if key else f"{msg}{where}")


def _yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The YAML and its `base:` chain, base first: (tree, " in <file>") per file, each checked key by key."""
    path = path.expanduser()
    if path.resolve() in seen:
        raise UserError(f"config {path}: circular base chain")
    tree = read_document(path, yaml.safe_load, (yaml.YAMLError,), missing="config file not found: {path}",
                         malformed="config {path} is not valid YAML: {reason}") or {}
    if not isinstance(tree, dict):
        raise UserError(f"config {path} must be a mapping of keys, got {type(tree).__name__}")
    base = tree.pop("base", None)
    _check_keys(tree, f" in {path}")
    if base is None:
        return [(tree, f" in {path}")]
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    return [*_yaml_layers(base_path, (*seen, path.resolve())), (tree, f" in {path}")]


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

    `overrides`: `["optim.lr=1e-3", "train.steps=100"]` (values parsed as YAML), a mapping of dotted keys
    to Python values, or the tree `parse_overrides` already returned (so a caller that also reads the
    overrides parses them once). Raises UserError with one line per problem.
    """
    schema = OmegaConf.structured(RunConfig)
    OmegaConf.set_readonly(schema, False)
    layers = _yaml_layers(Path(path)) if path is not None else []
    override_tree = parse_overrides(overrides)
    _check_keys(override_tree, _CLI)
    layers.append((override_tree, _CLI))
    plan = _step_plan(layers)
    merged = schema
    for tree, where in layers:
        try:
            merged = OmegaConf.merge(merged, tree)
        except OmegaConfBaseException as e:
            raise _user_error(e, where) from None
        except TypeError as e:  # e.g. a list given where a mapping belongs
            raise UserError(f"invalid value{where}: {e}") from None
    tree = OmegaConf.to_container(merged)
    _resolve_steps(tree, *plan)
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
    train = tree["train"]
    if "train.steps" in changes and "train.tokens" not in changes:
        train["tokens"] = None  # explicit steps replace a token plan (e.g. a cooldown fork)
    elif train.get("tokens") is not None and "train.steps" not in changes:
        train["steps"] = steps_for_tokens(train["tokens"], train["batch_size"], train["seq_len"])
    return config_from_dict(tree)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temp file + rename): a kill never leaves half a file."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


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
    if cfg.train.objective == "reward":  # a reward model: one score instead of the lm_head (qwenjax.train.reward)
        changes["num_labels"] = 1
    try:
        return preset(m.preset, **changes) if m.preset else ModelConfig(**changes)
    except TypeError as e:
        raise UserError(f"model: {e}") from None


def _tokenizer_vocab_size(cfg: RunConfig) -> int | None:
    if not cfg.data.tokenizer or cfg.data.tokenizer == MISSING:
        return None
    # sentencepiece loads only when a config names a tokenizer (the CLI imports this module at start-up)
    from qwenjax.data.tokenizer import load_tokenizer

    return int(load_tokenizer(cfg.data.tokenizer).vocab_size)


def stage_dir(cfg: RunConfig, i: int) -> Path:
    """Stage i's own run directory, inside the staged run's."""
    return Path(cfg.run_dir).expanduser() / "stages" / str(i)


def stage_config(cfg: RunConfig, i: int) -> RunConfig:
    """Stage i of a staged run as a run config of its own: the run's keys with the stage's on top, in
    `run_dir/stages/<i>`, starting from stage i - 1's run directory (`model.init_from`)."""
    previous = str(stage_dir(cfg, i - 1)) if i else None
    try:
        return cfg.replace(**stage_changes(cfg, i, str(stage_dir(cfg, i)), previous))
    except UserError as e:
        raise UserError(f"stages[{i}]: {e}") from None


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
