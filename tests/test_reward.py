"""Reward model (qwenjax.train.reward): HF Qwen2ForSequenceClassification parity both ways, the Bradley-Terry
objective against numpy, a short run on synthetic arithmetic pairs, init from an LM stage, bad pairs via the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
