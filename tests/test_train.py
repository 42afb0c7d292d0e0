"""The trainer: learning on real text, gradient accumulation, schedules, the vmappable step, --hparams,
divergence, run-directory files, and one-line errors for bad input (single CPU device, in-process)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import TINY, tiny_overrides

from qwenjax import cli
from qwenjax.config import ModelConfig
from qwenjax.errors import UserError
from qwenjax.run_config import load_config
from qwenjax.train import NEXT_TOKEN, init_train_state, make_hparams, mean_gradients, train, train_step
from qwenjax.train.optim import OptimStatic, learning_rate, make_hp

MICRO = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    max_window_layers=2, tie_word_embeddings=False)


def _random_batch(rng: int, batch: int, seq: int, vocab: int) -> dict[str, jax.Array]:
    r = np.random.default_rng(rng)
    tokens = r.integers(0, vocab, size=(batch, seq + 1))
    segment = np.ones((batch, seq), np.int32)
    segment[:, seq // 2:] = 2  # two packed documents per row
    positions = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])[None].repeat(batch, 0)
    mask = (r.random((batch, seq)) > 0.2).astype(np.float32)  # uneven token counts per row
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
            "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "segment_ids": jnp.asarray(segment), "positions": jnp.asarray(positions, jnp.int32),
            "loss_mask": jnp.asarray(mask)}


def test_grad_accumulation_equals_one_big_batch():
    hp = {**make_hp(lr=1e-2, warmup_steps=0, total_steps=10), **NEXT_TOKEN.make_hp(z_loss=1e-4)}
    state = init_train_state(MICRO, jax.random.key(0))
    batch = _random_batch(0, 8, 16, MICRO.vocab_size)
    grads, losses = {}, {}
    for k in (1, 4):
        fn = jax.jit(lambda p, b, h, k=k: mean_gradients(p, b, h, model_cfg=MICRO, grad_accum=k))
        grads[k], losses[k] = fn(state["params"], batch, hp)
    np.testing.assert_allclose(losses[1], losses[4], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[4]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(a))))


def test_train_step_vmaps_over_a_learning_rate_population():
    """What the sweep does: one compiled step for several learning rates, equal to separate runs."""
    static = OptimStatic()
    lrs = [1e-3, 1e-2]
    hps = [make_hp(lr=lr, warmup_steps=2, total_steps=10) for lr in lrs]
    state = init_train_state(MICRO, jax.random.key(1))
    batch = _random_batch(1, 4, 16, MICRO.vocab_size)
    step = jax.jit(lambda s, b, h: train_step(s, b, h, model_cfg=MICRO, optim_static=static))
    pop_step = jax.jit(jax.vmap(lambda s, h: train_step(s, batch, h, model_cfg=MICRO, optim_static=static)))
    pop_state = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    pop_hp = jax.tree.map(lambda *x: jnp.stack(x), *hps)
    for _ in range(2):
        pop_state, pop_metrics = pop_step(pop_state, pop_hp)
    for i, hp in enumerate(hps):
        s = state
        for _ in range(2):
            s, m = step(s, batch, hp)
        np.testing.assert_allclose(pop_metrics["loss"][i], m["loss"], rtol=1e-5)
        np.testing.assert_allclose(pop_metrics["lr"][i], m["lr"], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(pop_state["params"]), jax.tree.leaves(s["params"]), strict=True):
            # Adam divides by sqrt(v): parameters with near-zero gradients move by float32 noise x lr
            np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=0.01 * lrs[i])


def test_schedules():
    hp = make_hp(lr=1.0, warmup_steps=10, total_steps=101, min_lr_ratio=0.1, decay_fraction=0.2)
    lr = {s: [float(learning_rate(t, hp, s)) for t in range(101)] for s in ("cosine", "wsd", "constant")}
    for s in lr:
        assert lr[s][0] == pytest.approx(0.1) and lr[s][9] == pytest.approx(1.0)  # linear warmup
        assert max(lr[s]) == pytest.approx(1.0)
    assert lr["cosine"][100] == pytest.approx(0.1) and lr["cosine"][55] == pytest.approx(0.55, abs=0.01)
    assert lr["wsd"][80] == pytest.approx(1.0) and lr["wsd"][100] == pytest.approx(0.1)  # stable, then decay
    assert lr["wsd"][90] == pytest.approx(0.55)
    assert lr["constant"][100] == 1.0
    cfg = load_config(TINY)
    hp = make_hparams(cfg)
    assert set(hp) >= {"lr", "warmup_steps", "total_steps", "min_lr_ratio", "weight_decay"}
    assert all(v.dtype == jnp.float32 and v.shape == () for v in hp.values())
    assert float(hp["total_steps"]) == cfg.train.steps


def test_weight_decay_mask():
    from qwenjax.train.optim import decay_mask

    params = init_train_state(MICRO.replace(tie_word_embeddings=True), jax.random.key(0))["params"]
    mask = decay_mask(params, OptimStatic())
    assert not mask["embed_tokens"] and not mask["norm"]["weight"]
    layer = mask["layers"][0]
    assert layer["self_attn"]["q_proj"]["kernel"] and not layer["self_attn"]["q_proj"]["bias"]
    assert not layer["input_layernorm"]["weight"] and layer["mlp"]["down_proj"]["kernel"]
    assert decay_mask(params, OptimStatic(decay_embeddings=True))["embed_tokens"]


@pytest.mark.slow
def test_tiny_model_learns_real_text(tiny_config, tiny_token_cache, tmp_path):
    """configs/tiny.yaml (0.92M params, 200 steps of 32 x 64 tokens) on 2 MB of the Python stdlib: held-out
    loss well below the unigram entropy of the held-out tokens (measured: 4.48 nats vs an entropy of 5.16;
    the first step's loss is ln(1024) = 6.93)."""
    summary = train(tiny_config.replace(run_dir=str(tmp_path / "run")))
    entropy = tiny_token_cache.unigram_entropy("heldout")
    print(f"eval_loss {summary['eval_loss']:.3f}, unigram entropy {entropy:.3f}, "
          f"initial {summary['initial_loss']:.3f}, {summary['wall_s']:.1f} s, "
          f"{summary['tokens_per_s']:.0f} tokens/s, mfu {summary['mfu']:.1%}")
    assert not summary["diverged"]
    assert summary["initial_loss"] == pytest.approx(math.log(1024), abs=0.3)
    assert summary["eval_loss"] < entropy - 0.5
    assert summary["steps_completed"] == 200 and summary["tokens"] == 200 * 32 * 64


def test_run_files_divergence_and_noop_rerun(tiny_config, tiny_data, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = ["train", str(TINY), *tiny_overrides(tiny_config.data.cache_dir, run_dir, "train.steps=6",
                                                "train.log_every=2", "eval.every_steps=4", "eval.batches=1",
                                                "checkpoint.every_steps=4")]
    assert cli.main(args) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= set(r)
        assert r["tokens"] == r["step"] * 32 * 64
    assert "eval_loss" in records[2] and "eval_loss" in records[3] and "eval_loss" not in records[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("n_params", "n_params_total", "tokens", "steps", "batch_size", "seq_len", "lr", "final_loss",
                "eval_loss", "diverged", "wall_s", "flops", "compile_s", "hparams"):
        assert key in summary, key
    assert summary["n_params"] < summary["n_params_total"] and summary["diverged"] is False
    assert summary["final_loss"] == records[-1]["loss"]  # mean of the last 10% of 4 records = the last one
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6 and saved["run_dir"] == str(run_dir)
    assert any(p.name.startswith("events") for p in (run_dir / "tb").iterdir())
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir() if p.name.isdigit()) == ["4", "6"]

    # Rerunning the finished run is a no-op that returns the same summary.
    mtime = (run_dir / "summary.json").stat().st_mtime_ns
    assert cli.main(args) == 0
    assert (run_dir / "summary.json").stat().st_mtime_ns == mtime

    # A huge learning rate diverges: stopped early, reported, exit status 0.
    div_dir = tmp_path / "diverge"
    assert cli.main(["train", str(TINY), *tiny_overrides(
        tiny_config.data.cache_dir, div_dir, "train.steps=30", "optim.lr=30", "optim.warmup_steps=0",
        "optim.clip_norm=0", "train.log_every=1", "eval.batches=1")]) == 0
    summary = json.loads((div_dir / "summary.json").read_text())
    assert summary["diverged"] is True and summary["status"] == "diverged"
    assert summary["steps_completed"] < 30 and summary["eval_loss"] is None


def test_hparams_from_fit(tiny_config, tiny_data, tmp_path, monkeypatch):
    """--hparams: lr and batch from the prediction, steps keep D, explicit overrides win, provenance kept."""
    import qwenjax.scaling as scaling

    calls = {}

    def fake_predict(fit, n_params, tokens, seq_len=None, multiple_of=1):
        calls.update(n_params=n_params, tokens=tokens, seq_len=seq_len, multiple_of=multiple_of)
        return {"lr": 2e-3, "lr_ci": [1e-3, 4e-3], "batch_tokens": 32 * 64, "batch_tokens_ci": [1000, 4000],
                "batch_size": 32, "seq_len": seq_len, "n_params": n_params, "tokens": tokens}

    fake_fit = {"format": "fake", "quality": {"status": "ok", "laws": {}, "flags": []}}
    monkeypatch.setattr(scaling, "load_fit", lambda path: fake_fit)
    monkeypatch.setattr(scaling, "predict", fake_predict)
    fit = tmp_path / "FIT.json"
    fit.write_text("{}")
    run_dir = tmp_path / "run"
    config = tmp_path / "main.yaml"  # D = 4 x 16 x 64 tokens; the predicted batch of 32 keeps D with 2 steps
    config.write_text(f"base: {TINY}\ntrain:\n  steps: 4\n  batch_size: 16\n")
    # optim.lr given on the command line wins over the prediction
    overrides = tiny_overrides(tiny_config.data.cache_dir, run_dir, "optim.lr=5e-3", "eval.batches=1")
    assert cli.main(["train", str(config), *overrides, "--hparams", str(fit)]) == 0
    from qwenjax.model import count_params
    from qwenjax.run_config import model_config

    assert calls["n_params"] == count_params(model_config(tiny_config, vocab_size=1024))[1]
    assert calls["tokens"] == 4 * 16 * 64 and calls["seq_len"] == 64 and calls["multiple_of"] == 1
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 32 and saved["train"]["steps"] == 2
    assert saved["optim"]["lr"] == 5e-3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["hparams"]["source"] == str(fit.resolve())
    assert summary["hparams"]["prediction"]["lr"] == 2e-3
    assert summary["hparams"]["overridden"]["optim.lr"] == {"predicted": 2e-3, "used": 5e-3}
    assert summary["hparams"] == saved["hparams"]
    assert summary["steps_completed"] == 2 and summary["tokens"] == 4 * 16 * 64


@pytest.mark.parametrize("extra, message", [
    (["optim.lrr=0.1"],
     "unknown config key 'optim.lrr' in the command-line overrides (did you mean 'optim.lr'?)"),
    (["train.steps=ten"], "train.steps must be an integer, got 'ten'"),
    (["model.num_key_value_heads=3"],
     "model.num_attention_heads (4) must be divisible by model.num_key_value_heads (3)"),
    (["mesh.data=2", "mesh.fsdp=2"],
     "mesh.data x mesh.fsdp x mesh.tensor = 2 x 2 x 1 = 4, but there are 1 devices"),
    (["mesh.data=3", "mesh.fsdp=1"], "not divisible by the data-parallel size mesh.data x mesh.fsdp = 3"),
    (["data.path=DOES_NOT_EXIST"], "does not exist"),
    (["data.path=EMPTY"], "holds no text"),
    (["train.seq_len=2048"], "train.seq_len (2048) exceeds model.max_position_embeddings (1024)"),
    (["optim.lr=-1e-3"], "optim.lr must be positive"),
])
def test_bad_input_is_one_line(extra, message, tiny_config, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # an earlier run's files survive
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "empty.txt").write_text("")
    extra = [e.replace("DOES_NOT_EXIST", str(tmp_path / "nope")).replace("=EMPTY", f"={tmp_path / 'EMPTY'}")
             for e in extra]
    status = cli.main(["train", str(TINY), *tiny_overrides(tiny_config.data.cache_dir, run_dir, *extra)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("qwenjax: error:")]
    assert status == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_init_from_a_params_checkpoint(tiny_config, tiny_data, tmp_path):
    """model.init_from: start from saved params (model_io format) instead of a fresh init."""
    from qwenjax.model_io import save_model
    from qwenjax.run_config import model_config
    from qwenjax.train.metrics import read_metrics

    model_cfg = model_config(tiny_config, vocab_size=tiny_data.vocab_size)
    save_model(tmp_path / "init", model_cfg, init_train_state(model_cfg, jax.random.key(0))["params"])
    common = ("train.steps=2", "train.log_every=1", "eval.batches=1", "checkpoint.enabled=false")
    cache = tiny_config.data.cache_dir
    fresh = load_config(TINY, tiny_overrides(cache, tmp_path / "fresh", *common))
    loaded = load_config(TINY, tiny_overrides(cache, tmp_path / "loaded", *common, "seed=0",
                                              f"model.init_from={tmp_path / 'init'}"))
    train(fresh), train(loaded)
    a = [r["loss"] for r in read_metrics(tmp_path / "fresh" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "loaded" / "metrics.jsonl")]
    np.testing.assert_allclose(a, b, rtol=1e-6)
    wrong = load_config(TINY, tiny_overrides(cache, tmp_path / "wrong", *common, "model.hidden_size=64",
                                             f"model.init_from={tmp_path / 'init'}"))
    with pytest.raises(UserError, match="do not match"):
        train(wrong)
