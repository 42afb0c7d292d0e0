"""The sweep spec: a YAML file naming the axes of a learning-rate x batch-size study, validated on load.

```yaml
name: cpu-ladder
base: ../configs/sweep-base.yaml   # run config every run starts from (relative to this file, then cwd)
models: [{hidden_size: 64, ...}, {preset: qwen2.5-0.5b}]   # N axis (or `ladder:`)
tokens: [2.0e6, 8.0e6]             # D axis: training tokens per run
lr: {min: 1.0e-4, max: 3.0e-2, per_octave: 2}   # list | range | {around: prior | FIT.json}
batch_size: [8, 16, 32]            # global batch in sequences (list | {around: ...})
seeds: [0]
overrides: {train.seq_len: 256}    # applied to every run
population: lr                     # train runs that differ only in lr together (when that is faster)
resources: {CPU: 1}                # per run, for the Ray executor
max_extensions: 2                  # grid extensions per cell when the best run sits on an edge
warmup_fraction: 0.05              # optional: optim.warmup_steps = fraction x steps of each run
fork_cooldowns: true               # optional (WSD): shorter budgets fork their cooldown from the longest run
```

Everything a user can get wrong is caught here or in the planner with one `UserError` line that names the
key (with a did-you-mean), so a bad spec fails before any run starts. Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from qwenjax.errors import UserError, did_you_mean, read_document
from qwenjax.run_sections import ModelSection
from qwenjax.scaling.units import parse_count

SPEC_KEYS = ("name", "description", "base", "models", "ladder", "tokens", "lr", "batch_size", "seeds",
             "overrides", "population", "resources", "max_extensions", "warmup_fraction", "fork_cooldowns",
             "noise_seeds", "bracket_margin")
#: run-config keys that the sweep's axes set; an `overrides:` entry for one of them would be silently lost
AXIS_KEYS = {"optim.lr": "lr", "train.batch_size": "batch_size", "train.steps": "tokens", "seed": "seeds",
             "run_dir": "the sweep (runs/<run_id>)"}
#: model fields a `models:` entry or a ladder may set: the run config's model section (HF Qwen2Config names,
#: plus preset/init_from)
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelSection))
#: a ladder sets the shape fields itself; any other model field applies to all its models
SHAPE_KEYS = ("preset", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")
LADDER_KEYS = ("sizes", "head_dim", *[k for k in MODEL_KEYS if k not in SHAPE_KEYS])


@dataclasses.dataclass(frozen=True)
class Grid:
    """One hyperparameter axis.

    kind `list`: explicit `values`. kind `range`: every 2^(k/per_octave) in [min, max] (a log lattice shared
    by all cells, so runs of different cells use the same values). kind `around`: centred per (N, D) cell on
    the prior (`source` = "prior", the Step Law) or a saved fit (`source` = path of a FIT.json), spanning
    +-`span_octaves` with `per_octave` points per factor of two.
    """

    kind: str
    values: tuple[float, ...] = ()
    min: float | None = None
    max: float | None = None
    per_octave: int = 2
    source: str | None = None
    span_octaves: float = 2.0

    @property
    def adaptive(self) -> bool:
        return self.kind == "around"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    path: Path | None  # the spec file (None for specs built in code)
    base: Path | None  # the run config every run starts from (None = the trainer's defaults)
    models: tuple[dict, ...]  # model.* overrides per model (the N axis)
    tokens: tuple[float, ...]  # D axis
    lr: Grid
    batch_size: Grid
    seeds: tuple[int, ...] = (0,)
    overrides: dict = dataclasses.field(default_factory=dict)
    population: str | None = None
    resources: dict = dataclasses.field(default_factory=dict)
    max_extensions: int = 2
    warmup_fraction: float | None = None
    fork_cooldowns: bool = False  # runs that differ only in tokens share one stable phase (WSD)
    noise_seeds: tuple[int, ...] = ()  # extra seeds rerun at each cell's optimum once its grid is settled
    bracket_margin: float = 0.0  # extend until both lr edges at the best batch are this much worse than the best
    description: str = ""
    model_origin: str = "models"  # "models" or "ladder": which key error messages should name


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _check_keys(tree: Mapping, known: Sequence[str], where: str) -> None:
    for key in tree:
        if key not in known:
            raise UserError(f"{where}unknown key {key!r}{did_you_mean(key, known, list_known=True)}")


def _number(value, where: str, *, integer: bool = False) -> float:
    """A positive finite number; strings like '2M' or '1.5e9' are accepted for counts."""
    if isinstance(value, str) and not integer:
        return parse_count(value, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
            or (isinstance(value, float) and not math.isfinite(value)):  # isfinite(int) overflows on 10**400
        raise UserError(f"{where} must be a positive number, got {value!r}")
    if integer and (isinstance(value, float) and not value.is_integer()):
        raise UserError(f"{where} must be a positive integer, got {value!r}")
    return int(value) if integer else float(value)


#: Bounds that keep a typo from planning forever: grid points per axis, lattice density, token budgets (a
#: thousand times today's largest pretraining runs).
MAX_GRID_POINTS = 1000
MAX_PER_OCTAVE = 64
MAX_TOKENS = 1e18
MAX_PARAMS = 1e15


def lattice(lo: float, hi: float, per_octave: int) -> list[float]:
    """Every 2^(k/per_octave) in [lo, hi] (with a relative slack of 1e-9 for values written in decimal)."""
    k_lo = math.ceil(math.log2(lo) * per_octave - 1e-6)
    k_hi = math.floor(math.log2(hi) * per_octave + 1e-6)
    return [2.0 ** (k / per_octave) for k in range(k_lo, k_hi + 1)]


def _per_octave(value, key: str) -> int:
    per = _number(value, f"{key}.per_octave", integer=True)
    if per > MAX_PER_OCTAVE:
        raise UserError(f"{key}.per_octave must be at most {MAX_PER_OCTAVE}, got {per}")
    return per


def _grid(value, key: str, *, integer: bool) -> Grid:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise UserError(f"{key}: empty grid (give at least one value)")
        values = sorted({_number(v, f"{key}[{i}]", integer=integer) for i, v in enumerate(value)})
        return Grid("list", tuple(values))
    if not isinstance(value, Mapping):
        raise UserError(f"{key} must be a list of values or a mapping (min/max or around), got {value!r}")
    if "around" in value:
        _check_keys(value, ("around", "span_octaves", "per_octave"), f"{key}: ")
        source = value["around"]
        if not isinstance(source, str) or not source.strip():
            raise UserError(f"{key}.around must be 'prior' or the path of a FIT.json, got {source!r}")
        span = value.get("span_octaves", 1.0 if integer else 2.0)
        if isinstance(span, bool) or not isinstance(span, (int, float)) or not 0 <= span <= 64:
            raise UserError(f"{key}.span_octaves must be a number from 0 to 64, got {span!r}")
        per = _per_octave(value.get("per_octave", 1 if integer else 2), key)
        return Grid("around", source=source.strip(), span_octaves=float(span), per_octave=per)
    if integer:
        raise UserError(f"{key} must be a list of integers or {{around: prior | FIT.json}}, got {value!r}")
    _check_keys(value, ("min", "max", "per_octave"), f"{key}: ")
    for k in ("min", "max"):
        if k not in value:
            raise UserError(f"{key}: a range needs both min and max (missing {k})")
    lo, hi = _number(value["min"], f"{key}.min"), _number(value["max"], f"{key}.max")
    per = _per_octave(value.get("per_octave", 2), key)
    if lo > hi:
        raise UserError(f"{key}: min ({lo:g}) is larger than max ({hi:g})")
    if (math.log2(hi) - math.log2(lo)) * per > MAX_GRID_POINTS:
        raise UserError(f"{key}: min {lo:g} to max {hi:g} at {per} per octave is more than {MAX_GRID_POINTS} "
                        f"points; narrow the range")
    values = lattice(lo, hi, per)
    if not values:
        raise UserError(f"{key}: empty grid (no 2^(k/{per}) value lies between {lo:g} and {hi:g})")
    return Grid("range", tuple(values), min=lo, max=hi, per_octave=per)


def _model_entry(entry, where: str) -> dict:
    if isinstance(entry, str):  # a bare preset name
        entry = {"preset": entry}
    if not isinstance(entry, Mapping) or not entry:
        raise UserError(f"{where}: a model entry must be a mapping of model fields or {{preset: NAME}}, "
                        f"got {entry!r}")
    out = {}
    for key, value in entry.items():
        field = str(key).removeprefix("model.")
        if field not in MODEL_KEYS:
            raise UserError(f"{where}: unknown model field {key!r}{did_you_mean(field, MODEL_KEYS, list_known=True)}")
        out[field] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# The ladder: models of target non-embedding sizes with Qwen2.5's shape rules.


def auto_head_dim(hidden: int) -> int:
    """Qwen2.5 uses 64 (0.5B) and 128 (1.5B and up); far below that, narrower heads keep >= 4 of them."""
    if hidden >= 1536:
        return 128
    if hidden >= 256:
        return 64
    return 32 if hidden >= 128 else 16


def kv_heads_for(heads: int) -> int | None:
    """Qwen2.5's key/value head counts: 2 up to 3B (14-16 query heads), 4 at 7B (28), 8 from 14B (40+);
    fewer than 4 query heads share one. None when `heads` is not a multiple of that count."""
    if heads < 4:
        return 1
    kv = 8 if heads >= 40 else 4 if heads >= 28 else 2
    return None if heads % kv else kv


def intermediate_for(hidden: int) -> int:
    """About 5.4 x hidden (Qwen2.5-0.5B: 4864 / 896), rounded to a multiple of 64 (128 from hidden 1024)."""
    mult = 128 if hidden >= 1024 else 64
    return max(mult, int(round(5.4 * hidden / mult)) * mult)


def _layer_params(h: int, heads: int, kv: int, hd: int, inter: int) -> int:
    q, k = heads * hd, kv * hd
    return h * (q + 2 * k) + (q + 2 * k) + q * h + 3 * h * inter + 2 * h


def _target_aspect(n: float) -> float:
    """hidden / layers: Qwen2.5-0.5B has 37 at N = 3.6e8 and wider models go wider; ~11 at 1e5."""
    return 37.0 * (n / 3.6e8) ** 0.15


def ladder_shape(target: float, head_dim: int | None = None) -> dict:
    """The Qwen2.5-shaped model whose non-embedding size is closest to `target` at a Qwen-like aspect ratio.

    Searches widths (multiples of 16 below 512, of 64 below 1536, of 128 above) and picks the depth that
    best matches the size; the score weighs size error 4x the aspect-ratio error (both in log space).
    """
    widths = list(range(32, 512, 16)) + list(range(512, 1536, 64)) + list(range(1536, 16385, 128))
    best = None
    for h in widths:
        hd = head_dim or auto_head_dim(h)
        if h % hd:
            continue
        heads = h // hd
        kv = kv_heads_for(heads)
        if kv is None:
            continue
        inter = intermediate_for(h)
        per_layer = _layer_params(h, heads, kv, hd, inter)
        layers = max(1, round((target - h) / per_layer))
        n = layers * per_layer + h
        score = 4 * abs(math.log(n / target)) + abs(math.log((h / layers) / _target_aspect(target)))
        if best is None or score < best[0]:
            # head_dim divides hidden, so hidden // heads == head_dim: the config needs no explicit head_dim
            best = (score, dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=kv))
    if best is None:
        raise UserError(f"ladder: no width up to 16384 fits head_dim {head_dim} with Qwen2.5's head counts")
    return best[1]


def ladder_models(ladder: Mapping) -> list[dict]:
    """`ladder: {sizes: [3e4, 1e5, 3e5], head_dim: 16, tie_word_embeddings: true}` -> `models` entries."""
    if not isinstance(ladder, Mapping):
        raise UserError(f"ladder must be a mapping with `sizes: [...]`, got {ladder!r}")
    _check_keys(ladder, LADDER_KEYS, "ladder: ")
    sizes = ladder.get("sizes")
    if isinstance(sizes, (int, float, str)):
        sizes = [sizes]
    if not isinstance(sizes, list) or not sizes:
        raise UserError("ladder.sizes: empty grid (give target non-embedding parameter counts, "
                        "e.g. [1e5, 1e6])")
    head_dim = ladder.get("head_dim")
    if head_dim is not None:
        head_dim = _number(head_dim, "ladder.head_dim", integer=True)
    extra = {k: v for k, v in ladder.items() if k not in ("sizes", "head_dim")}
    models = []
    for i, size in enumerate(sizes):
        target = _number(size, f"ladder.sizes[{i}]")
        if target > MAX_PARAMS:
            raise UserError(f"ladder.sizes[{i}]: {target:g} is more than {MAX_PARAMS:g} parameters")
        models.append({**ladder_shape(target, head_dim), **extra})
    return models


# ---------------------------------------------------------------------------------------------------------
# Loading


def resolve_relative(path: str, spec_path: Path | None) -> Path:
    """A path in a spec: relative to the spec file's folder if it exists there, else to the cwd."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if spec_path is not None and (spec_path.parent / p).exists():
        return spec_path.parent / p
    return p


def parse_spec(tree: Mapping, path: Path | None = None) -> SweepSpec:
    """Validate a spec mapping (as read from YAML) into a SweepSpec."""
    where = f"sweep spec {path}: " if path else "sweep spec: "
    if not isinstance(tree, Mapping):
        raise UserError(f"{where}expected a mapping of keys, got {type(tree).__name__}")
    _check_keys(tree, SPEC_KEYS, where)
    name = tree.get("name") or (path.stem if path else "sweep")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"name must be letters, digits, '-', '_' or '.', got {name!r}")

    base = tree.get("base")
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise UserError(f"base must be the path of a run config YAML, got {base!r}")
        base = resolve_relative(base, path)
        if not base.is_file():
            raise UserError(f"base: run config not found: {base}")

    if ("models" in tree) == ("ladder" in tree):
        raise UserError("give either `models:` (a list of model shapes) or `ladder:` (target sizes), not "
                        + ("both" if "models" in tree else "neither"))
    if "models" in tree:
        models = tree["models"]
        if not isinstance(models, list) or not models:
            raise UserError("models: empty grid (give at least one model: {hidden_size: ...} "
                            "or {preset: NAME})")
        models = [_model_entry(m, f"models[{i}]") for i, m in enumerate(models)]
        origin = "models"
    else:
        models = ladder_models(tree["ladder"])
        origin = "ladder"

    if "tokens" not in tree:
        raise UserError("tokens: missing (the D axis: training tokens per run, e.g. [2.0e6, 8.0e6])")
    tokens = tree["tokens"]
    tokens = [tokens] if not isinstance(tokens, list) else tokens
    if not tokens:
        raise UserError("tokens: empty grid (give at least one token budget)")
    tokens = sorted({_number(t, f"tokens[{i}]") for i, t in enumerate(tokens)})
    if tokens[-1] > MAX_TOKENS:
        raise UserError(f"tokens: {tokens[-1]:g} is more than {MAX_TOKENS:g} tokens per run")

    for key in ("lr", "batch_size"):
        if key not in tree:
            raise UserError(f"{key}: missing (a list of values, or {{around: prior}})")
    lr = _grid(tree["lr"], "lr", integer=False)
    batch = _grid(tree["batch_size"], "batch_size", integer=True)

    seeds = _seed_list(tree.get("seeds", [0]), "seeds")
    if not seeds:
        raise UserError("seeds: empty grid (leave it out for the single seed 0)")
    noise_seeds = _seed_list(tree.get("noise_seeds", []), "noise_seeds")
    if overlap := sorted(set(seeds) & set(noise_seeds)):
        raise UserError(f"noise_seeds: {overlap} already in seeds; give seeds the grid does not use")

    overrides = tree.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise UserError(f"overrides must be a mapping of dotted run-config keys, got {overrides!r}")
    overrides = _flatten(overrides)
    for key in overrides:
        if key in AXIS_KEYS or key.startswith("model."):
            owner = "models/ladder" if key.startswith("model.") else AXIS_KEYS[key]
            raise UserError(f"overrides: {key!r} is set by the sweep ({owner}); remove it from overrides")

    population = tree.get("population")
    if population in (False, "none", "off"):
        population = None
    if population not in (None, "lr"):
        raise UserError(f"population must be 'lr' (train runs that differ only in lr together) or absent, "
                        f"got {population!r}")

    resources = tree.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise UserError(f"resources must be a mapping like {{CPU: 2}} or {{GPU: 1}}, got {resources!r}")
    for key, value in resources.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"resources.{key} must be a number >= 0, got {value!r}")

    max_ext = tree.get("max_extensions", 2)
    if isinstance(max_ext, bool) or not isinstance(max_ext, int) or max_ext < 0:
        raise UserError(f"max_extensions must be an integer >= 0, got {max_ext!r}")
    warmup = tree.get("warmup_fraction")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, (int, float))
                               or not 0 <= warmup < 1):
        raise UserError(f"warmup_fraction must be in [0, 1), got {warmup!r}")
    forks = tree.get("fork_cooldowns", False)
    if not isinstance(forks, bool):
        raise UserError(f"fork_cooldowns must be true or false, got {forks!r}")
    margin = tree.get("bracket_margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise UserError(f"bracket_margin must be a relative loss in [0, 1), e.g. 0.01, got {margin!r}")
    description = tree.get("description") or ""

    return SweepSpec(name=name, path=path, base=base, models=tuple(models), tokens=tuple(tokens), lr=lr,
                     batch_size=batch, seeds=tuple(seeds), overrides=overrides, population=population,
                     resources=dict(resources), max_extensions=max_ext,
                     warmup_fraction=None if warmup is None else float(warmup), fork_cooldowns=forks,
                     noise_seeds=tuple(noise_seeds), bracket_margin=float(margin), description=str(description),
                     model_origin=origin)


def _seed_list(value, key: str) -> list[int]:
    """A list of distinct integer seeds >= 0 (a single integer is a list of one)."""
    seeds = [value] if not isinstance(value, list) else value
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise UserError(f"{key}[{i}] must be an integer >= 0, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{key}: values repeat")
    return seeds


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    """{train: {seq_len: 256}} and {train.seq_len: 256} both -> {"train.seq_len": 256}."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in ("hparams", "model.rope_scaling"):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep spec YAML."""
    p = Path(path).expanduser()
    tree = read_document(p, yaml.safe_load, (yaml.YAMLError,), missing="sweep spec not found: {path}",
                         malformed="sweep spec {path} is not valid YAML: {reason}")
    if tree is None:
        raise UserError(f"sweep spec {p} is empty")
    return parse_spec(tree, p)


def spec_dict(spec: SweepSpec) -> dict[str, Any]:
    """JSON-safe summary of a spec (written to the sweep summary)."""
    d = dataclasses.asdict(spec)
    d["path"] = str(spec.path) if spec.path else None
    d["base"] = str(spec.base) if spec.base else None
    return d
