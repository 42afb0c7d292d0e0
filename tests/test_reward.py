"""Reward model (qwenjax.train.reward): HF Qwen2ForSequenceClassification parity both ways, the Bradley-Terry
objective against numpy, a short run on synthetic arithmetic pairs, init from an LM stage, bad pairs via the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, TRAIN_SCRIPT, run_python
from test_dpo import arithmetic_pairs

from qwenjax import hf, model_io
from qwenjax.config import ModelConfig
from qwenjax.model import init_params
from qwenjax.train import reward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
PAD = 0
pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


def padded_tokens() -> np.ndarray:
    """Three right-padded rows of lengths 12, 7 and 1 (pad = 0, never a real token here)."""
    tokens = np.random.default_rng(0).integers(1, 61, (3, 12))
    tokens[1, 7:] = PAD
    tokens[2, 1:] = PAD
    return tokens


def hf_reward_model(seed: int = 0, **overrides):
    """A random-weight HF Qwen2ForSequenceClassification (num_labels 1, float32, eager) with O(1) scores."""
    kw = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e4, num_labels=1, pad_token_id=PAD)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForSequenceClassification(
        transformers.Qwen2Config(attn_implementation="eager", **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def torch_rewards(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits[:, 0].float().numpy()


_rewards = jax.jit(reward.hf_rewards, static_argnums=(2, 3))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = hf_reward_model()
    path = tmp_path_factory.mktemp("hf") / "reward"
    model.save_pretrained(path)
    return model, path


def test_hf_parity_and_round_trip(hf_folder, tmp_path):
    model, path = hf_folder
    tokens = padded_tokens()
    ref = torch_rewards(model, tokens)
    assert np.abs(ref).max() > 0.5  # the scores are not trivially small
    config, params = hf.load_hf(path)
    assert config.num_labels == 1 and "lm_head" not in params and params["score"]["kernel"].shape == (64, 1)
    ours = np.asarray(_rewards(params, tokens, config, PAD))
    assert np.abs(ours - ref).max() < TOL, np.abs(ours - ref).max()
    # out again: transformers loads it as a sequence classifier with every tensor, and scores the same
    out = hf.save_hf(tmp_path / "out", config, params, extra_config={"pad_token_id": PAD})
    d = json.loads((out / "config.json").read_text())
    assert d["architectures"] == ["Qwen2ForSequenceClassification"] and d["num_labels"] == 1
    again, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert again.config.num_labels == 1
    assert np.abs(torch_rewards(again.eval(), tokens) - ref).max() < TOL
    # and through a qwenjax model directory (what convert and init_from read)
    model_io.save_model(tmp_path / "dir", config, params)
    config2, params2 = model_io.load_model(tmp_path / "dir")
    assert config2 == config
    assert np.abs(np.asarray(_rewards(params2, tokens, config2, PAD)) - ref).max() < TOL


def test_segment_ends_and_score_tokens():
    seg = np.array([[1, 1, 2, 2, 2, 3]])
    np.testing.assert_array_equal(np.asarray(reward.segment_ends(seg)), [[0, 1, 0, 0, 1, 1]])
    # ids 5 6 7 8 (8 = <|im_end|>), answer 7 8: inputs 5 6 7, targets 6 7 8, mask on 7 8; padded with 0
    inputs = np.array([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    targets = np.array([[6, 7, 8, 0, 0], [6, 7, 8, 9, 10]])
    mask = np.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]], np.float32)
    tokens, idx, valid = reward.score_tokens(jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(tokens), [[5, 6, 7, 8, 0], [5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(np.asarray(idx), [3, 4])  # the second side fills the row: its last slot
    assert np.asarray(valid).all()
    assert not bool(reward.score_tokens(jnp.zeros((1, 5), jnp.int32), jnp.zeros((1, 5), jnp.int32),
                                        jnp.zeros((1, 5)))[2][0])


def test_param_counts_of_a_reward_model():
    from qwenjax.config import param_counts
    from qwenjax.model import count_params

    for tie in (False, True):
        config = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, num_labels=1, tie_word_embeddings=tie)
        assert param_counts(config) == count_params(config)
        lm = config.replace(num_labels=None, tie_word_embeddings=True)
        assert count_params(config)[0] == count_params(lm)[0] + 32  # the head instead of an lm_head


def test_objective_equals_bradley_terry_in_numpy():
    config = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, initializer_range=0.3)
    params = init_params(config, 3)
    rng = np.random.default_rng(1)
    T = 8
    batch = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(1, 61, (3, T + 1))
        mask = np.zeros((3, T), np.float32)
        mask[:, 3:6] = 1  # the answer: targets 3..5, closing token = targets[5] = ids[6]
        batch.update({f"{side}_inputs": ids[:, :-1].astype(np.int32), f"{side}_targets": ids[:, 1:].astype(np.int32),
                      f"{side}_mask": mask})
    batch["rejected_mask"][2] = 0  # a padding row (both sides must be real)
    obj = reward.RewardLoss()
    value, sums = obj.sums(params, None, batch, {}, config)
    r = {}
    for side in ("chosen", "rejected"):
        full = np.concatenate([batch[f"{side}_inputs"][:, :7], batch[f"{side}_targets"][:, 6:7]], axis=1)
        r[side] = np.asarray(reward.token_scores(params, jnp.asarray(full), config))[:, 6]
    loss = np.log1p(np.exp(-(r["chosen"] - r["rejected"])))[:2]
    assert float(sums["count"]) == 2
    np.testing.assert_allclose(float(value), loss.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["margin"]), (r["chosen"] - r["rejected"])[:2].sum(), rtol=1e-5, atol=1e-6)
    assert float(sums["accuracy"]) == float(((r["chosen"] > r["rejected"])[:2]).sum())
    # the gradient reaches the head and the backbone
    grads = jax.grad(lambda p: obj.sums(p, None, batch, {}, config)[0])(params)
    assert float(jnp.abs(grads["score"]["kernel"]).sum()) > 0 and float(jnp.abs(grads["embed_tokens"]).sum()) > 0


# ---------------------------------------------------------------------------------------------------------
# Training (configs/reward-tiny.yaml on synthetic arithmetic pairs)

REWARD_TINY = CONFIGS / "reward-tiny.yaml"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in arithmetic_pairs(400)))
    return f


def reward_config(pairs_file, cache, run_dir, *extra):
    from qwenjax.run_config import load_config

    return load_config(REWARD_TINY, [f"data.path={pairs_file}", f"data.cache_dir={cache}", f"run_dir={run_dir}",
                                     *extra])


def metric_rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_reward_tiny_run_accuracy_rises(pairs_file, qwenjax_cache, tmp_path):
    """From a fresh init the chosen answers' reward pulls ahead; the model directory exports to HF."""
    from qwenjax.train import train

    run = tmp_path / "rm"
    summary = train(reward_config(pairs_file, qwenjax_cache, run, "train.log_every=1"))
    rows = metric_rows(run)
    assert summary["status"] == "ok" and len(rows) == 20, rows
    assert {"accuracy", "margin", "reward_chosen", "reward_rejected"} <= rows[-1].keys()
    late = rows[-5:]
    assert np.mean([r["accuracy"] for r in late]) >= 0.9, rows
    assert np.mean([r["margin"] for r in late]) > rows[0]["margin"] + 1.0, rows
    assert np.mean([r["loss"] for r in late]) < 0.5 * np.log(2), rows
    assert np.isfinite(summary["eval_loss"]) and summary["eval_loss"] < np.log(2)
    config, _ = model_io.load_model(run / "model")
    assert config.num_labels == 1


@pytest.fixture(scope="module")
def lm_stage(pairs_file, qwenjax_cache, tmp_path_factory):
    """A language-model stage with an lm_head (untied): 3 DPO steps on the same pairs and tokenizer."""
    from qwenjax.run_config import load_config
    from qwenjax.train import train

    run = tmp_path_factory.mktemp("lm") / "run"
    train(load_config(CONFIGS / "dpo-tiny.yaml", [f"data.path={pairs_file}", f"data.cache_dir={qwenjax_cache}",
                                                 f"run_dir={run}", "train.steps=3", "model.tie_word_embeddings=false"]))
    return run


def test_reward_from_an_lm_stage_then_to_hf(run_cli, pairs_file, qwenjax_cache, lm_stage, tmp_path):
    """model.init_from an LM run: its backbone, no lm_head, a zero head (step 1: loss log 2, margin 0); the
    result converts to a HF Qwen2ForSequenceClassification that transformers loads and that scores the same."""
    from qwenjax.train import train

    run = tmp_path / "rm"
    train(reward_config(pairs_file, qwenjax_cache, run, f"model.init_from={lm_stage}", "train.steps=4",
                        f"data.tokenizer={lm_stage / 'model' / 'tokenizer.model'}", "model.tie_word_embeddings=false",
                        "train.log_every=1"))
    rows = metric_rows(run)
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and rows[0]["margin"] == 0.0
    assert rows[0]["accuracy"] == 0.0  # every reward is 0: all ties
    assert rows[-1]["margin"] != 0.0
    lm_cfg, lm_params = model_io.load_model(lm_stage / "model")
    config, params = model_io.load_model(run / "model")
    assert "lm_head" in lm_params and "lm_head" not in params and config.num_labels == 1
    # convert --to-hf: config.json names the sequence classifier and the pad token (the tokenizer's eos)
    status, out, err = run_cli("convert", "--from", run / "model", "--to-hf", tmp_path / "hf")
    assert status == 0, err
    d = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert d["architectures"] == ["Qwen2ForSequenceClassification"] and d["num_labels"] == 1
    pad = d["pad_token_id"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf",
                                                                            attn_implementation="eager").eval()
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 10))
    tokens[tokens == pad] = pad + 1
    tokens[1, 6:] = pad
    ours = np.asarray(_rewards(params, tokens, config, pad))
    assert np.abs(torch_rewards(model, tokens) - ours).max() < TOL


def test_bad_pairs_via_cli_exit_2(run_cli, pairs_file, qwenjax_cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = pairs_file.read_text().splitlines()[:20]
    lines[6] = json.dumps({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": ""})
    bad.write_text("\n".join(lines) + "\n")
    status, _, err = run_cli("train", REWARD_TINY, f"data.path={bad}", f"data.cache_dir={qwenjax_cache}",
                             f"run_dir={tmp_path / 'run'}")
    lines = [x for x in err.splitlines() if x.strip()]
    assert status == 2 and f"{bad}:7: \"rejected\" is empty" in lines[-1], err
    assert sum(x.startswith("qwenjax: error") for x in lines) == 1 and "Traceback" not in err
    status, _, err = run_cli("train", REWARD_TINY, f"data.path={bad}", "train.objective=rewards",
                             f"run_dir={tmp_path / 'run2'}")
    assert status == 2 and "did you mean" in err and "reward" in err


def test_reward_run_resumes_exactly_and_exports(pairs_file, qwenjax_cache, tmp_path):
    """2 steps + 2 resumed steps (the score head in the checkpoint) log the losses of 4 straight steps; the
    run's newest checkpoint exports as a reward model directory."""
    from qwenjax.train import export_model, train

    common = ["train.log_every=1", "checkpoint.every_steps=2", "train.steps=4"]
    train(reward_config(pairs_file, qwenjax_cache, tmp_path / "straight", *common))
    train(reward_config(pairs_file, qwenjax_cache, tmp_path / "split", *common[:2], "train.steps=2"))
    train(reward_config(pairs_file, qwenjax_cache, tmp_path / "split", *common))
    straight, split = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "split")
    assert len(straight) == 4 and [r["loss"] for r in split] == [r["loss"] for r in straight]
    assert [r["margin"] for r in split] == [r["margin"] for r in straight]
    out = export_model(tmp_path / "split", tmp_path / "exported")
    config, params = model_io.load_model(out)
    assert config.num_labels == 1 and params["score"]["kernel"].shape == (config.hidden_size, 1)


def test_reward_fsdp_on_two_devices_equals_one(pairs_file, qwenjax_cache, tmp_path):
    """mesh.fsdp=2 (the backbone and the score head split over their embed axis) with train.grad_accum=2: the
    same losses and margins as one device, one batch."""
    args = [f"data.path={pairs_file}", f"data.cache_dir={qwenjax_cache}", "train.steps=4", "train.log_every=1"]
    for name, devices, extra in (("one", 1, []), ("two", 2, ["mesh.data=1", "mesh.fsdp=2", "train.grad_accum=2"])):
        proc = run_python(TRAIN_SCRIPT, str(REWARD_TINY), *args, f"run_dir={tmp_path / name}", *extra, devices=devices)
        assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (key, a, b)
        # the rewards' common level is free under Bradley-Terry (only differences count): Adam moves it by
        # steps of lr whatever the size of its gradient, so float32 rounding shows there first
        assert b["reward_chosen"] == pytest.approx(a["reward_chosen"], abs=1e-3), (a, b)
