"""RunConfig: defaults, YAML + base inheritance, overrides, one-line errors. No JAX needed (fast)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from qwenjax.config import PRESETS, ModelConfig
from qwenjax.errors import UserError
from qwenjax.run_config import (
    ModelSection,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    model_config,
    planned_tokens,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_valid_and_frozen():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg.optim.b1 == 0.9 and cfg.optim.b2 == 0.95 and cfg.optim.weight_decay == 0.1
    assert cfg.run_dir == str(Path("runs") / "run")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_model_section_covers_every_model_config_field():
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"remat", "num_labels"}  # from train.*
    section_fields = {f.name for f in dataclasses.fields(ModelSection)}
    assert model_fields <= section_fields
    assert section_fields - model_fields == {"preset", "init_from"}


def test_yaml_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 128},
        "train": {"steps": 10, "batch_size": 8, "seq_len": 32},
        "optim": {"lr": 1e-3}}))
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 20\noptim:\n  schedule: wsd\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=2e-3", "data.max_bytes=1000000"])
    assert cfg.train.steps == 20 and cfg.train.batch_size == 8  # child over base
    assert cfg.optim.lr == 2e-3 and cfg.optim.schedule == "wsd"  # override over child
    assert cfg.data.max_bytes == 1_000_000
    assert cfg.run_dir == str(Path("runs") / "child")
    assert planned_tokens(cfg) == 20 * 8 * 32
    mc = model_config(cfg)
    assert mc.hidden_size == 64 and mc.vocab_size == cfg.data.vocab_size  # no preset: tokenizer's size
    assert model_config(cfg, vocab_size=777).vocab_size == 777
    # mapping overrides with Python values
    cfg2 = load_config(tmp_path / "child.yaml", {"train.steps": 7, "hparams": {"source": "x.json"}})
    assert cfg2.train.steps == 7 and cfg2.hparams == {"source": "x.json"}


def test_preset_and_overrides():
    cfg = load_config(None, ["model.preset=qwen2.5-7b", "model.num_hidden_layers=2", "train.seq_len=64"])
    mc = model_config(cfg)
    assert mc.hidden_size == PRESETS["qwen2.5-7b"].hidden_size and mc.num_hidden_layers == 2
    assert mc.vocab_size == PRESETS["qwen2.5-7b"].vocab_size


def test_sources_and_roundtrip(tmp_path):
    cfg = load_config(None, ["data.sources=[{path: a.txt, weight: 3}, {path: b.txt}]", "seed=3",
                             "model.rope_scaling={rope_type: yarn, factor: 4.0}"])
    assert [(s.path, s.weight) for s in cfg.data.sources] == [("a.txt", 3.0), ("b.txt", 1.0)]
    assert cfg.data.weighted_paths() == [("a.txt", 3.0), ("b.txt", 1.0)]
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert cfg.replace(**{"optim.lr": 0.5}).optim.lr == 0.5


@pytest.mark.parametrize("overrides, message", [
    (["train.step=3"],
     "unknown config key 'train.step' in the command-line overrides (did you mean 'train.steps'?)"),
    (["lr=1e-3"], "did you mean 'optim.lr'?"),
    (["train.steps=abc"], "train.steps must be an integer, got 'abc'"),
    (["train.steps=0"], "train.steps must be a positive integer"),
    (["optim.lr=-0.1"], "optim.lr must be positive, got -0.1"),
    (["optim.schedule=cosin"], "did you mean 'cosine'?"),
    (["model.num_attention_heads=6", "model.num_key_value_heads=4", "model.hidden_size=96"],
     "must be divisible by model.num_key_value_heads"),
    (["train.seq_len=70000"], "train.seq_len (70000) exceeds model.max_position_embeddings (32768)"),
    (["mesh.data=3", "mesh.fsdp=1", "train.batch_size=8"], "not divisible by the data-parallel size"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one of"),
    (["model.tie_word_embeddings=maybe"], "model.tie_word_embeddings must be true or false"),
    (["train.batch_size=10", "train.grad_accum=3"], "divisible by train.grad_accum"),
    (["data.path=a", "data.sources=[{path: b}]"], "not both"),
    (["steps"], "must look like KEY=VALUE"),
])
def test_errors_are_one_clear_line(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(UserError, match=r"config key 'optim.lrr' in .*bad.yaml \(did you mean 'optim.lr'"):
        load_config(bad)
    bad.write_text("train:\n  steps: [1, 2]\n")
    with pytest.raises(UserError, match="train.steps must be an integer"):
        load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="circular"):
        load_config(tmp_path / "loop.yaml")


def test_shipped_configs_load():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert "tiny.yaml" in names and "sweep-base.yaml" in names
    for p in CONFIGS.glob("*.yaml"):
        cfg = load_config(p)
        mc = model_config(cfg, vocab_size=1024)
        assert mc.num_attention_heads % mc.num_key_value_heads == 0
    for size in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b"):
        cfg = load_config(CONFIGS / f"qwen2.5-{size}.yaml")
        assert model_config(cfg) == PRESETS[f"qwen2.5-{size}"].replace(
            **{k: v for k, v in dataclasses.asdict(cfg.model).items()
               if k not in ("preset", "init_from") and v is not None})
