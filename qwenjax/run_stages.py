"""Staged training in the run config: the `stages:` list and `data.length_mix` (no JAX, like run_config).

A staged run (docs/long-context.md, "Stages") trains its stages in order in one run directory; each stage
changes what may change without changing a parameter's shape: the sequence length, the RoPE base and
scaling, the batch, the steps (or tokens), the learning rate and the mix of sequence lengths. This module
parses and checks the list; `qwenjax.train.stages` runs it.

`length_mix: {full: 0.4, short: 0.6, short_len: N}` (Qwen2.5-Turbo's 40/60 is the default of a stage):
`full` is the share of each batch's rows packed as usual (windows of seq_len tokens, documents up to the
whole row); `short` the share whose documents are cut into pieces of at most `short_len` tokens (default
seq_len // 4), segment ids and positions restarting at each piece, so attention never spans more than
short_len tokens in those rows. Shares must sum to 1; a missing share is 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from qwenjax.errors import UserError, did_you_mean

LENGTH_MIX_KEYS = ("full", "short", "short_len")
DEFAULT_LENGTH_MIX = {"full": 0.4, "short": 0.6, "short_len": None}  # Qwen2.5-Turbo: 40% at full length


def parse_length_mix(value: Any, where: str = "data.length_mix") -> dict[str, Any] | None:
    """None, or `{full, short, short_len}` checked: shares in [0, 1] summing to 1, short_len a positive int."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise UserError(f"{where} must be a mapping like {{full: 0.4, short: 0.6}}, got {value!r}")
    for key in value:
        if key not in LENGTH_MIX_KEYS:
            raise UserError(f"unknown key {where}.{key}" + did_you_mean(str(key), LENGTH_MIX_KEYS, list_known=True))
    out = {"full": value.get("full") or 0.0, "short": value.get("short") or 0.0, "short_len": value.get("short_len")}
    for key in ("full", "short"):
        share = out[key]
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise UserError(f"{where}.{key} must be a share in [0, 1], got {share!r}")
        out[key] = float(share)
    if not math.isclose(out["full"] + out["short"], 1.0, abs_tol=1e-6):
        raise UserError(f"{where}: the shares full ({out['full']:g}) + short ({out['short']:g}) must sum to 1, "
                        f"got {out['full'] + out['short']:g}")
    n = out["short_len"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"{where}.short_len must be a positive integer (tokens), got {n!r}")
    return out


def short_len_of(mix: Mapping[str, Any], seq_len: int) -> int:
    """The cap on document pieces in the short rows: `short_len`, else seq_len // 4 (at least 1)."""
    return int(mix["short_len"] or max(1, seq_len // 4))


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One entry of `stages:`; None = inherited from the run config (except length_mix: Turbo's 40/60).
    `reset_optimizer`: start this stage with fresh Adam moments instead of the previous stage's."""

    seq_len: int
    steps: int | None = None
    tokens: float | None = None
    name: str | None = None
    batch_size: int | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int | None = None
    length_mix: dict[str, Any] | None = None
    reset_optimizer: bool = False
    lr: float | None = None
    warmup_steps: int | None = None


STAGE_KEYS = tuple(f.name for f in dataclasses.fields(StageSpec))
_ALIASES = {"model.rope_theta": "rope_theta", "model.rope_scaling": "rope_scaling",
            "model.max_position_embeddings": "max_position_embeddings", "train.seq_len": "seq_len",
            "train.steps": "steps", "train.tokens": "tokens", "train.batch_size": "batch_size",
            "data.length_mix": "length_mix", "optim.lr": "lr", "optim.warmup_steps": "warmup_steps"}


def _int(where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where} must be a positive integer, got {value!r}")
    return value


def parse_stage(i: int, entry: Any) -> StageSpec:
    """One stage from its YAML mapping (flat keys; `model.rope_theta` style names are accepted too)."""
    where = f"stages[{i}]"
    if isinstance(entry, StageSpec):
        return entry
    if not isinstance(entry, Mapping):
        raise UserError(f"{where} must be a mapping (seq_len, steps or tokens, rope_theta, ...), got {entry!r}")
    kwargs = {}
    for key, value in entry.items():
        name = _ALIASES.get(str(key), str(key))
        if name not in STAGE_KEYS:
            raise UserError(f"unknown key {where}.{key}" + did_you_mean(str(key), STAGE_KEYS, list_known=True))
        kwargs[name] = value
    for key in ("tokens", "rope_theta", "lr"):  # YAML 1.1 reads 1.0e9 (no sign) as a string
        if isinstance(kwargs.get(key), str):
            try:
                kwargs[key] = float(kwargs[key])
            except ValueError:
                pass
    if kwargs.get("seq_len") is None:
        raise UserError(f"{where}.seq_len is missing (every stage sets its sequence length)")
    _int(f"{where}.seq_len", kwargs["seq_len"])
    steps, tokens = kwargs.get("steps"), kwargs.get("tokens")
    if (steps is None) == (tokens is None):
        raise UserError(f"{where}: give one of steps and tokens, got {'both' if steps is not None else 'neither'}")
    if steps is not None:
        _int(f"{where}.steps", steps)
    elif isinstance(tokens, bool) or not isinstance(tokens, int | float) or not 1 <= tokens < float("inf"):
        raise UserError(f"{where}.tokens must be a positive number of tokens, got {tokens!r}")
    for key in ("batch_size", "max_position_embeddings"):
        if kwargs.get(key) is not None:
            _int(f"{where}.{key}", kwargs[key])
    for key in ("rope_theta", "lr"):
        v = kwargs.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf")):
            raise UserError(f"{where}.{key} must be a positive number, got {v!r}")
    if kwargs.get("warmup_steps") is not None and (not isinstance(kwargs["warmup_steps"], int)
                                                   or kwargs["warmup_steps"] < 0):
        raise UserError(f"{where}.warmup_steps must be an integer >= 0, got {kwargs['warmup_steps']!r}")
    if kwargs.get("rope_scaling") is not None and not isinstance(kwargs["rope_scaling"], Mapping):
        raise UserError(f"{where}.rope_scaling must be a mapping (HF rope_scaling), got {kwargs['rope_scaling']!r}")
    if not isinstance(kwargs.get("reset_optimizer", False), bool):
        raise UserError(f"{where}.reset_optimizer must be true or false, got {kwargs['reset_optimizer']!r}")
    mix = kwargs.get("length_mix")
    kwargs["length_mix"] = parse_length_mix(DEFAULT_LENGTH_MIX if mix is None else mix, f"{where}.length_mix")
    if kwargs["length_mix"]["short_len"] is not None and kwargs["length_mix"]["short_len"] >= kwargs["seq_len"]:
        raise UserError(f"{where}.length_mix.short_len ({kwargs['length_mix']['short_len']}) must be below the "
                        f"stage's seq_len ({kwargs['seq_len']})")
    if kwargs.get("name") is not None:
        kwargs["name"] = str(kwargs["name"])
    return StageSpec(**kwargs)


def parse_stages(value: Any) -> tuple[StageSpec, ...] | None:
    """`stages:` checked: a non-empty list of stages whose seq_len never decreases."""
    if value is None:
        return None
    if isinstance(value, Mapping) or not isinstance(value, list | tuple) or not value:
        raise UserError(f"stages must be a non-empty list of stages, got {value!r}")
    stages = tuple(parse_stage(i, entry) for i, entry in enumerate(value))
    for i in range(1, len(stages)):
        if stages[i].seq_len < stages[i - 1].seq_len:
            raise UserError(f"stages[{i}].seq_len ({stages[i].seq_len}) is below stages[{i - 1}].seq_len "
                            f"({stages[i - 1].seq_len}): a stage list must not decrease the sequence length")
    return stages


def stage_name(i: int, stage: StageSpec) -> str:
    return stage.name or (f"{stage.seq_len // 1024}k" if stage.seq_len % 1024 == 0 else str(stage.seq_len))


def stage_changes(cfg, i: int, stage_dir: str, previous_dir: str | None) -> dict[str, Any]:
    """The dotted changes that turn the staged run config `cfg` into stage i's own run config."""
    s = cfg.stages[i]
    changes: dict[str, Any] = {"stages": None, "run_dir": stage_dir, "train.seq_len": s.seq_len,
                               "data.length_mix": s.length_mix}
    if s.steps is not None:
        changes["train.steps"] = s.steps
    else:
        changes["train.tokens"] = s.tokens
    for key, dotted in (("batch_size", "train.batch_size"), ("rope_theta", "model.rope_theta"),
                        ("rope_scaling", "model.rope_scaling"), ("lr", "optim.lr"),
                        ("max_position_embeddings", "model.max_position_embeddings"),
                        ("warmup_steps", "optim.warmup_steps")):
        if getattr(s, key) is not None:
            changes[dotted] = getattr(s, key)
    if previous_dir is not None:  # carry the params, and the Adam state unless this stage resets it
        changes["model.init_from"] = previous_dir
        changes["train.resume_optimizer"] = not s.reset_optimizer
    elif s.reset_optimizer:
        changes["train.resume_optimizer"] = False
    return changes
