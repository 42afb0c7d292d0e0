"""Dual chunk attention (qwenjax/dca.py): against a per-query numpy reference written from the position rules
(not from dca.py), plain attention within one chunk, cached decoding, and the HF config field."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import cli, dca, model_io
from qwenjax import generate as gen
from qwenjax.config import ModelConfig, load_hf_config
from qwenjax.errors import UserError
from qwenjax.model import init_params, logits

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

# Qwen2.5-7B-Instruct-1M's config.json fields (no download: the shape is the 7B's, the long-context fields
# are those of the released 1M models; vLLM reads the dual_chunk_attention_config block).
QWEN_1M_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 1010000, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-05, "rope_theta": 10000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "dual_chunk_attention_config": {"chunk_size": 262144, "local_size": 8192,
                                    "original_max_position_embeddings": 262144},
}

TINY = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
                   initializer_range=0.2, tie_word_embeddings=True)


def _dca_config(chunk, local, original=None, base=TINY):
    d = {"chunk_size": chunk, "local_size": local}
    if original:
        d["original_max_position_embeddings"] = original
    return base.replace(dual_chunk_attention_config=d)


def _np_rope(x_NH, pos, theta):
    """Rotate-half RoPE of one token's heads [N, H] at position `pos`, float64."""
    H = x_NH.shape[-1]
    angles = pos * theta ** (-np.arange(0, H, 2) / H)
    cos, sin = np.cos(np.concatenate([angles, angles])), np.sin(np.concatenate([angles, angles]))
    rotated = np.concatenate([-x_NH[..., H // 2:], x_NH[..., :H // 2]], axis=-1)
    return x_NH * cos + rotated * sin


def _reference(q_TNH, k_SKH, v_SKH, slots, chunk, local, theta, original=None):
    """One query at a time: each visible key's score with the query rotated for that key's relation."""
    N, H = q_TNH.shape[1:]
    K = k_SKH.shape[1]
    Lc = chunk - local
    k_rot = np.stack([_np_rope(k_SKH[s], s % Lc, theta) for s in range(k_SKH.shape[0])])
    out = np.zeros(q_TNH.shape)
    for t, p in enumerate(slots):
        positions = {"intra": p % Lc, "succ": min(p % Lc + Lc, chunk), "inter": min(2 * Lc - 1, chunk)}
        factor = 1.0 if not original else max(1.0, 0.1 * np.log((p + 1) / original) + 1)
        q_rot = {r: _np_rope(q_TNH[t] * factor, pos, theta) for r, pos in positions.items()}
        chunk_s = np.arange(p + 1) // Lc
        relation_s = np.where(chunk_s == p // Lc, "intra", np.where(chunk_s == p // Lc - 1, "succ", "inter"))
        for n in range(N):
            k_sH = k_rot[: p + 1, n // (N // K)]
            scores = np.select([relation_s == r for r in q_rot], [k_sH @ q_rot[r][n] for r in q_rot]) / np.sqrt(H)
            w = np.exp(scores - scores.max())
            out[t, n] = (w / w.sum()) @ v_SKH[: p + 1, n // (N // K)]
    return out


def _rotated_keys(config, k_BSKH):
    B, S = k_BSKH.shape[:2]
    return dca.apply_rope(k_BSKH, *dca.key_cos_sin(config, B, S, None, k_BSKH.dtype))


@pytest.mark.parametrize("original", [None, 100], ids=["plain", "temperature"])
def test_dca_equals_per_query_reference(original):
    """T = 300, chunk 64, local 16 (chunk_len 48: 7 chunks), GQA 4 query heads on 2 kv heads, blocks of 128."""
    T, N, K, H = 300, 4, 2, 16
    config = _dca_config(64, 16, original)
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, T, n, H)) for n in (N, K, K))
    got = jax.jit(lambda q, k, v: dca.attend(config, q, _rotated_keys(config, k), v, query_block=128))(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    want = _reference(q[0], k[0], v[0], range(T), 64, 16, 1e4, original)
    assert np.abs(np.asarray(got)[0] - want).max() < 2e-5


def test_cached_queries_equal_reference():
    """Queries at slots 100..104 over a cache of 160 slots (keys past the query are garbage and masked)."""
    S, N, K, H = 160, 4, 2, 16
    config = _dca_config(40, 8)
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=(1, 5, N, H)), rng.normal(size=(1, S, K, H)), rng.normal(size=(1, S, K, H))
    got = dca.attend(config, jnp.asarray(q, jnp.float32), _rotated_keys(config, jnp.asarray(k, jnp.float32)),
                     jnp.asarray(v, jnp.float32), q_offset=jnp.int32(100))
    want = _reference(q[0], k[0], v[0], range(100, 105), 40, 8, 1e4)
    assert np.abs(np.asarray(got)[0] - want).max() < 2e-5


_forward = jax.jit(logits, static_argnums=0)


def test_one_chunk_is_plain_attention_and_longer_is_not():
    params = init_params(TINY, 0)
    tokens = np.random.default_rng(2).integers(0, TINY.vocab_size, (2, 48))
    config = _dca_config(64, 16)  # chunk_len 48: 48 tokens fit
    assert np.array_equal(np.asarray(_forward(config, params, tokens)), np.asarray(_forward(TINY, params, tokens)))
    longer = np.random.default_rng(3).integers(0, TINY.vocab_size, (1, 120))
    with_dca, plain = (np.asarray(_forward(c, params, longer))[0] for c in (config, TINY))
    assert np.abs(with_dca[:48] - plain[:48]).max() < 1e-4  # causal: the first chunk is unchanged
    assert np.abs(with_dca[48:] - plain[48:]).max() > 1e-2


def test_generate_equals_uncached_forward_across_chunks():
    """chunk_len 16: the prompt (10 tokens) and 30 decoded tokens cross two chunk boundaries (16, 32)."""
    config = _dca_config(24, 8)
    params = init_params(config, 4)
    prompt = [3, 14, 15, 9, 26, 5, 35, 8, 97, 93]
    steps = list(gen.stream(config, params, prompt, max_new_tokens=30))
    sequence = prompt + [s.token for s in steps]
    full = np.asarray(_forward(config, params, np.asarray([sequence])))[0]  # causal: row t = the prefix's last
    for i, step in enumerate(steps):
        expected = full[len(prompt) - 1 + i]
        assert np.abs(np.asarray(step.logits) - expected).max() < 1e-4, i
        assert step.token == int(np.argmax(expected)), i
    prefix = np.asarray(_forward(config, params, np.asarray([sequence[:37]])))[0, -1]  # and one prefix on its own
    assert np.abs(prefix - full[36]).max() < 1e-4


def test_hf_config_loads_round_trips_and_validates(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN_1M_CONFIG))
    config = load_hf_config(tmp_path)
    assert config.dca_dict == QWEN_1M_CONFIG["dual_chunk_attention_config"]
    assert dca.chunk_len(config) == 253952
    assert dca.query_positions(config, jnp.arange(1))[2] == 262144  # inter: min(2 chunk_len - 1, chunk_size)
    assert ModelConfig.from_hf_dict(config.to_hf_dict()).to_hf_dict() == config.to_hf_dict()
    assert config.to_hf_dict()["dual_chunk_attention_config"] == QWEN_1M_CONFIG["dual_chunk_attention_config"]
    assert "dual_chunk_attention_config" not in TINY.to_hf_dict()
    saved = json.loads(json.dumps(model_io.config_to_dict(config)))  # a model directory's model_config.json
    assert model_io.config_from_dict(saved) == config
    with pytest.raises(UserError, match="local_size"):
        _dca_config(64, 64)


def test_bad_dca_config_is_one_line_exit_2(tmp_path, capsys):
    bad = {**QWEN_1M_CONFIG, "dual_chunk_attention_config": {"chunk_size": 8192, "local_size": 8192}}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    assert cli.main(["convert", "--from-hf", str(tmp_path), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "local_size (8192) must be smaller than chunk_size (8192)" in err and "\n" not in err
