"""Cooldown forks from WSD runs: the 1-sqrt decay, where a fork starts, a fork equal bit for bit to the run
trained directly to its budget, fork planning (families, shared warmup, savings, --dry-run), and the specs
that cannot fork (one line, exit 2). The sweep end to end (results lines, resume mid-fork) is in
test_sweep_run.py."""

from __future__ import annotations

import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import TINY, tiny_overrides
from test_resume import _final_state

from qwenjax.errors import UserError
from qwenjax.run_config import config_to_dict, load_config
from qwenjax.sweep.plan import Planner, describe, families, fork_plan, run_id_of
from qwenjax.sweep.spec import parse_spec
from qwenjax.train.metrics import read_metrics
from qwenjax.train.optim import learning_rate, make_hp, wsd_decay_start

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1}


# ---------------------------------------------------------------------------------------------------------
# The schedule


def test_wsd_decay_shapes():
    hp = make_hp(lr=1.0, warmup_steps=10, total_steps=101, min_lr_ratio=0.1, decay_fraction=0.2)
    steps = jnp.arange(101)
    linear = np.asarray(learning_rate(steps, hp, "wsd", "linear"))
    sqrt = np.asarray(learning_rate(steps, hp, "wsd", "1-sqrt"))
    start = wsd_decay_start(101, 0.2, 10)
    assert start == 80
    np.testing.assert_array_equal(sqrt[:start + 1], linear[:start + 1])  # warmup and stable phase: identical
    progress = np.clip((np.arange(101) - start) / (100 - start), 0, 1)
    np.testing.assert_allclose(sqrt[start:], 0.1 + 0.9 * (1 - np.sqrt(progress[start:])), rtol=1e-6)
    assert sqrt[100] == pytest.approx(0.1) and sqrt[90] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert np.all(sqrt[start + 1:] < linear[start + 1:] + 1e-7)  # 1-sqrt drops faster at first
    with pytest.raises(UserError) as e:
        load_config(None, ["optim.decay_shape=sqrt"])
    assert str(e.value) == "optim.decay_shape must be one of linear, 1-sqrt, got 'sqrt' (did you mean '1-sqrt'?)"


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_fork_step_is_where_the_decay_starts(shape):
    """Every step before the fork step gets the same lr, bit for bit, under any longer budget; the fork step
    is the last one at the peak (so the float32 emulation of the schedule's decay start is exact)."""
    for total in (2, 7, 10, 33, 64, 100, 257, 1000, 4097):
        for fraction in (0.1, 0.2, 0.25, 1 / 3, 0.5, 1.0):
            for warmup in (0, 3, 40):
                k = wsd_decay_start(total, fraction, warmup)
                hps = [make_hp(lr=3e-3, warmup_steps=warmup, total_steps=n, decay_fraction=fraction)
                       for n in (total, total + 1, 2 * total + 5)]
                lrs = [np.asarray(learning_rate(jnp.arange(total), hp, "wsd", shape)) for hp in hps]
                for longer in lrs[1:]:
                    np.testing.assert_array_equal(longer[:k + 1], lrs[0][:k + 1])
                if warmup <= k < total - 1 and fraction < 1:
                    assert lrs[0][k] == np.float32(3e-3) and lrs[0][k + 1] < lrs[0][k], (total, fraction, warmup)


# ---------------------------------------------------------------------------------------------------------
# The trainer: a fork equals the direct run


def test_fork_equals_the_direct_run_bit_for_bit(tiny_config, tiny_data, tmp_path):
    """A 40-step WSD run hands its state to 24- and 16-step runs at their decay starts (18: between logged
    steps; 12: a logged step); each fork then trains its cooldown and ends identical to its direct run:
    every metrics line (loss, lr, grad norm, eval loss), the summary and the final parameters."""
    from qwenjax.run_config import model_config
    from qwenjax.train import train

    cache = tiny_config.data.cache_dir
    common = [*(f"model.{k}={v}" for k, v in MODEL.items()), "train.seq_len=64", "train.batch_size=4",
              "train.log_every=4", "optim.schedule=wsd", "optim.decay_shape=1-sqrt", "optim.decay_fraction=0.25",
              "optim.warmup_steps=3", "optim.lr=6e-3", "eval.every_steps=8", "eval.batches=1",
              "checkpoint.every_steps=8", "checkpoint.keep=1"]

    def cfg(name: str, steps: int):
        return load_config(TINY, tiny_overrides(cache, tmp_path / name, *common, f"train.steps={steps}"))

    forks = [cfg("fork24", 24), cfg("fork16", 16)]
    parent = train(cfg("parent", 40), forks=forks)
    assert [r["step"] for r in read_metrics(tmp_path / "parent" / "metrics.jsonl")] == \
        [1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]  # handing over adds no record to the parent
    assert parent["status"] == "ok" and "fork_of" not in parent
    model_cfg = model_config(forks[0], vocab_size=tiny_data.vocab_size)
    for fork, steps, start in ((forks[0], 24, 18), (forks[1], 16, 12)):
        fork_dir = Path(fork.run_dir)
        assert sorted(p.name for p in (fork_dir / "ckpt").iterdir()) == [str(start)]
        summary = train(fork)
        direct = train(cfg(f"direct{steps}", steps))
        assert summary["fork_of"] == str(tmp_path / "parent") and summary["fork_step"] == start
        assert "fork_of" not in direct
        for key in ("final_loss", "eval_loss", "initial_loss", "tokens", "steps_completed", "status"):
            assert summary[key] == direct[key], key
        curve = read_metrics(fork_dir / "metrics.jsonl")
        direct_curve = read_metrics(tmp_path / f"direct{steps}" / "metrics.jsonl")
        assert [r["step"] for r in curve] == [r["step"] for r in direct_curve] and curve[-1]["step"] == steps
        for a, b in zip(curve, direct_curve, strict=True):
            for key in ("loss", "lr", "grad_norm", "eval_loss", "tokens"):
                assert a.get(key) == b.get(key), (a["step"], key)
        step_a, a = _final_state(fork_dir, model_cfg)
        step_b, b = _final_state(tmp_path / f"direct{steps}", model_cfg)
        assert step_a == step_b == steps
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the parent, trained again with the same forks, is a no-op; a fork with its own state is left alone
    assert train(cfg("parent", 40), forks=forks)["final_loss"] == parent["final_loss"]


def test_forks_must_be_the_same_run_with_fewer_steps(tiny_config, tmp_path):
    from qwenjax.train import fork_steps

    cache = tiny_config.data.cache_dir
    parent = load_config(TINY, tiny_overrides(cache, tmp_path / "p", "optim.schedule=wsd", "train.steps=100"))
    fork = parent.replace(**{"train.steps": 50, "run_dir": str(tmp_path / "f")})
    assert fork_steps(parent, [fork]) == {40: [fork]}
    for bad, message in ((fork.replace(**{"optim.lr": 1.0}), "differs from"),
                         (parent.replace(**{"run_dir": str(tmp_path / "f")}), "not fewer than 100"),
                         (fork.replace(**{"optim.warmup_steps": 1}), "optim.warmup_steps")):
        with pytest.raises(UserError, match=message):
            fork_steps(parent, [bad])
    with pytest.raises(UserError, match="optim.schedule: wsd"):
        cosine = {"optim.schedule": "cosine"}
        fork_steps(parent.replace(**cosine), [fork.replace(**cosine)])


# ---------------------------------------------------------------------------------------------------------
# Planning


def spec_tree(**changes) -> dict:
    tree = {"name": "forks", "base": str(TINY), "models": [MODEL], "tokens": [8192, 16384, 32768],
            "lr": [1e-3, 4e-3], "batch_size": [4, 8], "warmup_fraction": 0.1, "fork_cooldowns": True,
            "overrides": {"train.seq_len": 64, "optim.schedule": "wsd"}}
    tree.update(changes)
    return {k: v for k, v in tree.items() if v is not None}


def test_families_share_their_warmup_and_fork_at_each_decay_start(tmp_path):
    runs = Planner(parse_spec(spec_tree()), tmp_path).initial_runs()
    groups = families(runs)
    assert len(runs) == 12 and sorted(len(g) for g in groups) == [3, 3, 3, 3]
    forks = fork_plan(runs)
    assert len(forks) == 8
    for family in groups:
        parent, *rest = family
        assert [r.tokens for r in family] == [32768, 16384, 8192]
        shortest = round(8192 / (parent.batch_size * 64))
        assert {r.cfg.optim.warmup_steps for r in family} == {round(0.1 * shortest)}  # one warmup per family
        for r in rest:
            assert forks[r.run_id] == (parent, wsd_decay_start(r.steps, 0.2, r.cfg.optim.warmup_steps))
    d = describe(runs, forks)
    saved = sum(forks[r.run_id][1] * r.batch_size * 64 for r in runs if r.run_id in forks)
    assert d["tokens"] == 4 * (8192 + 16384 + 32768) and d["tokens_with_forks"] == d["tokens"] - saved
    assert 0.3 < 1 - d["tokens_with_forks"] / d["tokens"] < 0.4  # budgets 1:2:4, decay 20%: ~34% saved
    # without forks every budget warms up over its own steps (and nothing forks)
    plain = Planner(parse_spec(spec_tree(fork_cooldowns=None)), tmp_path).initial_runs()
    assert len({r.cfg.optim.warmup_steps for r in plain if r.batch_size == 4}) == 3


def test_the_default_decay_shape_keeps_earlier_run_ids(tmp_path):
    from qwenjax.sweep.plan import _digest, _without

    run = Planner(parse_spec(spec_tree()), tmp_path).initial_runs()[0]
    tree = config_to_dict(run.cfg)
    assert tree["optim"]["decay_shape"] == "linear"
    assert run.run_id == _digest(_without(tree, ["run_dir", "optim.decay_shape"]))  # the id before the key
    assert run_id_of(run.cfg.replace(**{"optim.decay_shape": "1-sqrt"})) != run.run_id


def test_dry_run_shows_the_forks_and_the_saving(tmp_path, run_cli):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_tree()))
    status, out, err = run_cli("sweep", spec, "--out", tmp_path / "o", "--dry-run", "--no-probe")
    assert status == 0, err
    rows = [line for line in out.splitlines() if re.search(r" [0-9a-f]{12}@\d+$", line)]
    assert len(rows) == 8  # every shorter budget names its parent and its fork step
    assert "forks: 8 runs train only their cooldown" in out and "% saved" in out
    assert not (tmp_path / "o").exists()


def _base_with(tmp_path: Path, **optim) -> str:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"base": str(TINY), "optim": optim}))
    return str(base)


@pytest.mark.parametrize("changes, message", [
    ({"overrides": {"train.seq_len": 64}},  # tiny.yaml's cosine
     "fork_cooldowns: true needs optim.schedule: wsd (only WSD keeps a stable phase that every token budget "
     "shares), but the runs use 'cosine'"),
    ({"overrides": {"train.seq_len": 64, "optim.schedule": "constant"}}, "but the runs use 'constant'"),
    ({"overrides": {"train.seq_len": 64, "optim.schedule": "wsd", "checkpoint.enabled": False}},
     "fork_cooldowns: true needs checkpoint.enabled: true"),
    ({"fork_cooldowns": "yes"}, "fork_cooldowns must be true or false, got 'yes'"),
])
def test_specs_that_cannot_fork_fail_with_one_line(tmp_path, run_cli, changes, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_tree(**changes)))
    out = tmp_path / "out"
    for extra in (["--dry-run", "--no-probe"], []):
        status, stdout, err = run_cli("sweep", spec, "--out", out, *extra)
        assert status == 2 and message in err and err.strip().count("\n") == 0, err
        assert not (out / "results.jsonl").exists() and not (out / "spec.json").exists()


def test_a_wsd_base_with_a_cosine_override_cannot_fork(tmp_path):
    tree = spec_tree(base=_base_with(tmp_path, schedule="wsd"),
                     overrides={"train.seq_len": 64, "optim.schedule": "cosine"})
    with pytest.raises(UserError, match="but the runs use 'cosine'"):
        Planner(parse_spec(tree), tmp_path)
    Planner(parse_spec(spec_tree(base=_base_with(tmp_path, schedule="wsd"), overrides={"train.seq_len": 64})),
            tmp_path)  # the base alone may set wsd
