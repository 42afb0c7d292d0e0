"""From a spec to runs: one fully resolved `RunConfig` per (model, tokens, lr, batch, seed), with a stable id.

A run's identity is its config: `run_id` hashes the canonical JSON of `config_to_dict(cfg)` without
`run_dir`, so the same spec planned again (a resumed sweep, an extension found again) yields the same ids
and run directories, and any change that would change training yields a new run.

Runs also carry the keys the executors group by:
- `shape_key`: runs that compile to the same training step (equal shapes; lr and schedule values are
  traced by the trainer), which run one after another in one worker process;
- `population_key`: runs that differ only in their learning rate, which may train together as one
  vectorised program (`population: lr`);
- `family_key`: runs that differ only in their token budget. With `fork_cooldowns` (WSD schedules), the
  longest run of a family trains in full and every shorter one forks from its state at the step where the
  shorter run's decay starts (`fork_step`), training only its cooldown.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from qwenjax.config import PRESET_FIELDS, ModelConfig, flops_per_token, param_counts
from qwenjax.errors import UserError
from qwenjax.hparams import steps_for_tokens
from qwenjax.run_config import RunConfig, config_to_dict, load_config, model_config
from qwenjax.scaling.units import format_count
from qwenjax.sweep import adaptive
from qwenjax.sweep.spec import SweepSpec

#: config keys whose values are traced by the trainer (make_hparams) or do not touch the compiled step
TRACED_KEYS = ("run_dir", "seed", "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio",
               "optim.weight_decay", "train.steps", "train.log_every", "checkpoint", "eval.every_steps",
               "hparams")


def _digest(obj, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:n]


def _without(tree: dict, dotted_keys: Iterable[str]) -> dict:
    tree = json.loads(json.dumps(tree))  # deep copy
    for key in dotted_keys:
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.get(part, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree


def replace_dotted(cfg, changes: dict):
    """A copy of a (nested, frozen) dataclass config with dotted keys replaced; sections re-validate."""
    grouped: dict[str, dict] = {}
    top = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            grouped.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, sub in grouped.items():
        top[head] = replace_dotted(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **top)


#: config keys added after sweeps had recorded results, with their defaults: left out of the run id at that value,
#: so the runs of an earlier results.jsonl keep their ids (and are not trained again)
LATER_KEYS = {"optim.decay_shape": "linear"}


def run_id_of(cfg: RunConfig) -> str:
    """Stable id: hash of the resolved config minus run_dir (and minus LATER_KEYS at their defaults)."""
    tree = config_to_dict(cfg)
    defaults = [k for k, v in LATER_KEYS.items() if tree[k.split(".")[0]][k.split(".")[1]] == v]
    return _digest(_without(tree, ["run_dir", *defaults]))


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One entry of the N axis, resolved: its overrides, ModelConfig and parameter counts."""

    index: int
    overrides: dict  # dotted model.* keys
    config: ModelConfig
    n_params: int  # non-embedding (N of the laws)
    n_params_total: int

    @property
    def label(self) -> str:
        c = self.config
        return f"h{c.hidden_size}-l{c.num_hidden_layers}"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    run_id: str
    cfg: RunConfig
    model: ModelInfo
    tokens: float  # the cell's D, as in the spec (the trained tokens may differ by the rounding of steps)
    lr: float
    batch_size: int
    seed: int
    grid: str  # "initial" | "extension" | "noise" (a settled cell's optimum rerun with a noise seed)

    @property
    def seq_len(self) -> int:
        return self.cfg.train.seq_len

    @property
    def steps(self) -> int:
        return self.cfg.train.steps

    @property
    def tokens_trained(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    @property
    def flops(self) -> float:
        return flops_per_token(self.model.config, self.seq_len) * self.tokens_trained

    @property
    def cell(self) -> tuple[int, float]:
        return (self.model.index, self.tokens)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def shape_key(self) -> str:
        return _digest(_without(config_to_dict(self.cfg), TRACED_KEYS))

    @property
    def population_key(self) -> str:
        return _digest(_without(config_to_dict(self.cfg), ["run_dir", "optim.lr"]))

    @property
    def family_key(self) -> str:
        return _digest(_without(config_to_dict(self.cfg), ["run_dir", "train.steps"]))

    @property
    def fork_step(self) -> int:
        """Where this run's WSD decay starts: a longer run of its family hands over its state there."""
        from qwenjax.train.optim import wsd_decay_start  # qwenjax.train loads JAX; the sweep driver does not

        o = self.cfg.optim
        return wsd_decay_start(self.steps, o.decay_fraction, o.warmup_steps)

    @property
    def name(self) -> str:
        return (f"{self.model.label}/D{format_count(self.tokens)}/lr{self.lr:.3g}/b{self.batch_size}"
                f"/s{self.seed}")

    def row(self, sweep_name: str) -> dict:
        """The result-line fields known before the run starts."""
        c = self.model.config
        return {
            "run_id": self.run_id, "name": self.name, "sweep": sweep_name,
            "n_params": self.model.n_params, "n_params_total": self.model.n_params_total,
            "tokens": self.tokens, "tokens_trained": self.tokens_trained, "steps": self.steps,
            "lr": self.lr, "batch_size": self.batch_size, "batch_tokens": self.batch_size * self.seq_len,
            "seq_len": self.seq_len, "seed": self.seed, "flops": self.flops,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size,
            # relative to the sweep folder, so results.jsonl stays valid wherever the folder is moved
            "grid": self.grid, "run_dir": f"runs/{self.run_id}",
        }


class Planner:
    """Resolves a spec against its base config; makes runs for (model, tokens, lr, batch, seed) points."""

    def __init__(self, spec: SweepSpec, out_dir: str | Path):
        self.spec = spec
        self.out_dir = Path(out_dir)
        self.runs_dir = self.out_dir / "runs"
        try:  # the base alone (its model section decides what a preset entry must reset)
            self._base_model = config_to_dict(load_config(spec.base, {}))["model"]
        except UserError as e:
            raise UserError(f"base: {e}") from None
        self.models: list[ModelInfo] = []
        self._model_cfgs: dict[int, RunConfig] = {}
        for i, entry in enumerate(spec.models):
            where = f"{spec.model_origin}[{i}]"
            overrides = self._model_overrides(entry)
            try:
                cfg = self._load(overrides)
                mc = model_config(cfg)
            except UserError as e:
                about_model = "model" in str(e) or "max_position" in str(e)
                raise UserError(f"{where}: {e}" if about_model else str(e)) from None
            total, non_embedding = param_counts(mc)
            self.models.append(ModelInfo(i, overrides, mc, int(non_embedding), int(total)))
            self._model_cfgs[i] = cfg
        seq_lens = {c.train.seq_len for c in self._model_cfgs.values()}
        self.seq_len = seq_lens.pop()
        if spec.fork_cooldowns:
            self._check_forks(self._model_cfgs[0])
        self._prior = {}
        for key in ("lr", "batch_size"):
            grid = getattr(spec, key)
            if grid.adaptive:
                self._prior[key] = adaptive.Prior(grid.source, spec.path)

    @staticmethod
    def _check_forks(cfg: RunConfig) -> None:
        """What `fork_cooldowns` needs from the runs' config (the same for every model)."""
        if cfg.optim.schedule != "wsd":
            raise UserError(f"fork_cooldowns: true needs optim.schedule: wsd (only WSD keeps a stable phase that "
                            f"every token budget shares), but the runs use {cfg.optim.schedule!r}; set "
                            "optim.schedule: wsd in the base config or overrides")
        if not cfg.checkpoint.enabled:
            raise UserError("fork_cooldowns: true needs checkpoint.enabled: true (a fork resumes from its "
                            "parent's checkpoint)")

    # -- config assembly ------------------------------------------------------------------------------
    def _model_overrides(self, entry: dict) -> dict:
        out = {}
        if "preset" in entry:
            out.update({f"model.{k}": None for k in PRESET_FIELDS if self._base_model.get(k) is not None})
        out.update({f"model.{k}": v for k, v in entry.items()})
        return out

    def _load(self, extra: dict) -> RunConfig:
        try:
            return load_config(self.spec.base, {**self.spec.overrides, **extra})
        except UserError as e:
            raise UserError(str(e).replace("in the command-line overrides", "in the sweep spec")) from None

    def steps_for(self, tokens: float, batch_size: int) -> int:
        return steps_for_tokens(tokens, batch_size, self.seq_len)

    def _model_cfg(self, model_index: int) -> RunConfig:
        if model_index not in self._model_cfgs:
            self._model_cfgs[model_index] = self._load(self.models[model_index].overrides)
        return self._model_cfgs[model_index]

    def run(self, model_index: int, tokens: float, lr: float, batch_size: int, seed: int,
            grid: str = "initial") -> PlannedRun:
        model = self.models[model_index]
        steps = self.steps_for(tokens, batch_size)
        lr = float(f"{lr:.6g}")
        changes = {"train.steps": steps, "train.batch_size": int(batch_size), "optim.lr": lr,
                   "seed": int(seed)}
        if self.spec.warmup_fraction is not None:
            # forks share their parent's first steps, so a family warms up as its shortest budget does
            warm_from = self.steps_for(min(self.spec.tokens), batch_size) if self.spec.fork_cooldowns else steps
            changes["optim.warmup_steps"] = int(round(self.spec.warmup_fraction * warm_from))
        # dataclasses.replace re-runs each section's validation without OmegaConf's (slow) merge
        cfg = replace_dotted(self._model_cfg(model_index), {**changes, "run_dir": ""})
        rid = run_id_of(cfg)
        cfg = dataclasses.replace(cfg, run_dir=str(self.runs_dir / rid))
        return PlannedRun(rid, cfg, model, float(tokens), lr, int(batch_size), int(seed), grid)

    # -- grids ----------------------------------------------------------------------------------------
    def cell_grid(self, model_index: int, tokens: float) -> tuple[list[float], list[int]]:
        n = self.models[model_index].n_params
        lrs = adaptive.lr_values(self.spec.lr, self._prior.get("lr"), n, tokens)
        batches = adaptive.batch_values(self.spec.batch_size, self._prior.get("batch_size"), n, tokens,
                                        self.seq_len)
        if not batches:
            raise UserError(f"tokens {tokens:g}: every batch of the adaptive grid is larger than the budget "
                            f"(seq_len {self.seq_len}); raise tokens")
        return lrs, batches

    def check_budgets(self) -> None:
        """Every token budget must hold at least one batch of every batch size asked for."""
        if self.spec.batch_size.adaptive:
            return
        for tokens in self.spec.tokens:
            for b in self.spec.batch_size.values:
                if tokens < b * self.seq_len:
                    raise UserError(
                        f"tokens {tokens:g} is smaller than one batch ({int(b)} sequences x seq_len "
                        f"{self.seq_len} = {int(b) * self.seq_len} tokens); raise tokens or lower batch_size")

    def initial_runs(self) -> list[PlannedRun]:
        self.check_budgets()
        runs = []
        for m in self.models:
            for tokens in self.spec.tokens:
                lrs, batches = self.cell_grid(m.index, tokens)
                for b in batches:
                    for lr in lrs:
                        for seed in self.spec.seeds:
                            runs.append(self.run(m.index, tokens, lr, b, seed))
        return _unique(runs)

    def lr_factor(self) -> float | None:
        g = self.spec.lr
        return adaptive.lr_step(g) if g.adaptive or len(g.values) > 1 else None

    def batch_factor(self) -> float | None:
        g = self.spec.batch_size
        if g.adaptive:
            return 2.0 ** (1.0 / g.per_octave)
        if len(g.values) < 2:
            return None
        return min(b / a for a, b in zip(g.values, g.values[1:], strict=False))

    def extension_runs(self, cell: tuple[int, float], rows: list[dict]) -> list[PlannedRun]:
        """The next extension of a cell from its result lines so far (empty: bracketed)."""
        model_index, tokens = cell
        points = adaptive.extension_points(rows, self.lr_factor(), self.batch_factor(),
                                           margin=self.spec.bracket_margin)
        runs = []
        for lr, b in points:
            if b * self.seq_len > tokens:
                continue  # a batch beyond the budget cannot be run
            for seed in self.spec.seeds:
                runs.append(self.run(model_index, tokens, lr, b, seed, grid="extension"))
        return _unique(runs)


    def noise_runs(self, cell: tuple[int, float], rows: list[dict]) -> list[PlannedRun]:
        """The cell's best point (mean loss over its seeds) again with each of `noise_seeds`: the seed-to-seed
        spread at the optimum is the noise floor that every regret is judged against."""
        point = adaptive.best_point(rows)
        if point is None or not self.spec.noise_seeds:
            return []
        lr, b = point
        return _unique([self.run(cell[0], cell[1], lr, b, seed, grid="noise") for seed in self.spec.noise_seeds])


def _unique(runs: list[PlannedRun]) -> list[PlannedRun]:
    seen, out = set(), []
    for r in runs:
        if r.run_id not in seen:
            seen.add(r.run_id)
            out.append(r)
    return out


def families(runs: Iterable[PlannedRun]) -> list[list[PlannedRun]]:
    """The runs grouped by `family_key`, each group longest first (its parent)."""
    groups: dict[str, list[PlannedRun]] = defaultdict(list)
    for r in runs:
        groups[r.family_key].append(r)
    return [sorted(g, key=lambda r: -r.steps) for g in groups.values()]


def fork_plan(runs: Iterable[PlannedRun]) -> dict[str, tuple[PlannedRun, int]]:
    """run_id -> (parent, fork step) for every run that forks when these runs train together: the shorter
    runs of each family whose decay starts after step 0 (the trainer's `fork_steps` makes the same choice)."""
    out = {}
    for family in families(runs):
        for r in family[1:]:
            if r.fork_step > 0:
                out[r.run_id] = (family[0], r.fork_step)
    return out


def trained_share(run: PlannedRun, forks: dict[str, tuple[PlannedRun, int]]) -> float:
    """The fraction of its steps a run trains itself: after its fork step if it forks, else all."""
    return 1.0 - forks[run.run_id][1] / run.steps if run.run_id in forks else 1.0


def describe(runs: list[PlannedRun], forks: dict[str, tuple[PlannedRun, int]] | None = None) -> dict:
    """Totals for a plan (for the dry run and the summary); with `forks`, also what training takes when the
    forks start from their parents (`tokens_with_forks`, `flops_with_forks`)."""
    out = {"runs": len(runs), "flops": sum(float(r.flops) for r in runs),  # floats: absurd sizes give inf
           "tokens": sum(float(r.tokens_trained) for r in runs),
           "cells": len({r.cell for r in runs}), "shapes": len({r.shape_key for r in runs})}
    if forks is not None:
        out.update(forks=len(forks),
                   tokens_with_forks=sum(float(r.tokens_trained) * trained_share(r, forks) for r in runs),
                   flops_with_forks=sum(float(r.flops) * trained_share(r, forks) for r in runs))
    return out
