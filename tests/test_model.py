"""The model vs HF `Qwen2ForCausalLM` (random weights, eager attention); packing, bf16, counts, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.config import PRESETS, ModelConfig
from qwenjax.errors import UserError
from qwenjax.model import count_params, logits, to_layout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FLOAT32_TOL = 1e-4
# bf16 params and compute vs HF's bf16 eager forward (`from_pretrained(dtype=bfloat16)`) on the same weights,
# "head-dim-override" case, logits up to ~5: measured max abs difference 0.047 (mean 0.009), while HF bf16 vs
# float32 itself differs by 0.103; with XLA_FLAGS=--xla_allow_excess_precision=false the two are bit-identical
# (docs/model.md). The default gap is XLA keeping fused elementwise chains in float32.
BF16_MAX_TOL = 0.1
BF16_MEAN_TOL = 0.02

_forward = jax.jit(logits, static_argnums=0)


pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


def hf_model(seed: int = 0, **overrides):
    """A random-weight HF model whose logits are O(1): matrices N(0, 0.15^2), biases N(0, 0.1^2), norms ~1."""
    kw = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e4,
              rms_norm_eps=1e-6, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(attn_implementation="eager", **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    return model


def to_qwenjax(model) -> tuple[ModelConfig, dict]:
    """Direct conversion (independent of qwenjax.hf): Linear weight [out, in] -> kernel [in, out]."""
    config = ModelConfig.from_hf_dict(model.config.to_dict())
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    layers = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = {n: {"kernel": sd[p + f"self_attn.{n}.weight"].T}
                for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        for n in ("q_proj", "k_proj", "v_proj"):
            attn[n]["bias"] = sd[p + f"self_attn.{n}.bias"]
        layers[i] = {"input_layernorm": {"weight": sd[p + "input_layernorm.weight"]}, "self_attn": attn,
                     "post_attention_layernorm": {"weight": sd[p + "post_attention_layernorm.weight"]},
                     "mlp": {n: {"kernel": sd[p + f"mlp.{n}.weight"].T}
                             for n in ("gate_proj", "up_proj", "down_proj")}}
    params = {"embed_tokens": sd["model.embed_tokens.weight"], "layers": layers,
              "norm": {"weight": sd["model.norm.weight"]}}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    return config, jax.tree.map(jnp.asarray, params)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


PARITY_CASES = {
    # tied, GQA ratio 1, head_dim 64, odd vocab, theta 1e4, eps 1e-5
    "tied-mha-hd64": dict(vocab_size=101, hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                          tie_word_embeddings=True, rope_theta=1e4, rms_norm_eps=1e-5),
    # untied, GQA ratio 2, head_dim 128, theta 1e6, eps 1e-6
    "untied-gqa2-hd128": dict(vocab_size=97, hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                              rope_theta=1e6, rms_norm_eps=1e-6),
    # explicit head_dim != hidden / heads, untied, GQA ratio 2
    "head-dim-override": dict(vocab_size=130, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, rope_theta=1e6),
    # tied, GQA ratio 3, head_dim 16, eps 1e-5
    "tied-gqa3": dict(vocab_size=77, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                      tie_word_embeddings=True, rms_norm_eps=1e-5),
    # layer 1 (>= max_window_layers) attends to the last 4 positions only
    "sliding-window": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    # every layer attends to the last 4 positions only (layers alike: runs under scan too)
    "sliding-window-all": dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
    # YaRN with the explicit factor (HF >= PR #40320 semantics)
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                 max_position_embeddings=128),
}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("case", PARITY_CASES)
def test_float32_parity_with_transformers(case, scan):
    model = hf_model(**PARITY_CASES[case])
    config, params = to_qwenjax(model)
    if scan and not config.uniform_layers:  # layers that differ cannot share one scanned body: a clear refusal
        with pytest.raises(UserError, match="scan_layers: true needs every layer alike"):
            config.replace(scan_layers=True)
        return
    config = config.replace(scan_layers=scan)
    params = to_layout(params, config)
    if case == "sliding-window":
        assert config.uses_sliding_window(1) and not config.uses_sliding_window(0)
    if case == "yarn":
        assert dict(config.rope_scaling)["factor"] == 4.0
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 24))
    ref = hf_logits(model, tokens)
    ours = np.asarray(_forward(config, params, tokens))
    assert np.abs(ref).max() > 1.0  # logits of a meaningful size
    assert np.abs(ours - ref).max() < FLOAT32_TOL
    if case in ("sliding-window", "sliding-window-all", "yarn"):  # the feature changes the logits
        plain = config.replace(use_sliding_window=False, rope_scaling=None)
        assert np.abs(np.asarray(_forward(plain, params, tokens)) - ref).max() > 1e-2


def test_packed_segments_equal_documents_run_alone():
    config, params = to_qwenjax(hf_model(3))
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, config.vocab_size, 7), rng.integers(0, config.vocab_size, 9)
    packed = np.concatenate([doc_a, doc_b])
    pad = np.zeros(16, int)
    # one batch, one compile: [packed, packed without segment ids, doc a alone, doc b alone] (right-padded,
    # which causal attention ignores)
    tokens = np.stack([packed, packed, np.concatenate([doc_a, pad[:9]]), np.concatenate([doc_b, pad[:7]])])
    restart = list(range(7)) + list(range(9))
    positions = jnp.asarray([restart, restart, list(range(16)), list(range(16))])
    segment_ids = jnp.asarray([[0] * 7 + [1] * 9, [0] * 16, [0] * 16, [0] * 16])
    out = np.asarray(_forward(config, params, tokens, positions=positions, segment_ids=segment_ids))
    np.testing.assert_allclose(out[0, :7], out[2, :7], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:], out[3, :9], atol=1e-5)
    # without segment ids the second document would see the first: the check above is not vacuous
    assert np.abs(out[1, 7:] - out[3, :9]).max() > 1e-2


def test_bfloat16_parity_with_transformers(tmp_path):
    model = hf_model(5, **PARITY_CASES["head-dim-override"])
    config, params32 = to_qwenjax(model)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 24))
    ref32 = hf_logits(model, tokens)
    # as users run it: loaded in bf16 (`model.to(bfloat16)` would also round HF's float32 RoPE inv_freq)
    model.save_pretrained(tmp_path)
    model16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                                attn_implementation="eager")
    ref16 = hf_logits(model16.eval(), tokens)
    config16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    ours16 = np.asarray(_forward(config16, params16, tokens).astype(jnp.float32))
    diff = np.abs(ours16 - ref16)
    assert diff.max() < BF16_MAX_TOL and diff.mean() < BF16_MEAN_TOL
    # ours is about as far from float32 as HF's own bf16 forward (measured 0.101 vs 0.103)
    assert np.abs(ours16 - ref32).max() < 1.5 * np.abs(ref16 - ref32).max()


# Spec §2.1, computed from the official shapes.
SPEC_COUNTS = {
    "qwen2.5-0.5b": (494_032_768, 357_898_112),
    "qwen2.5-1.5b": (1_543_714_304, 1_310_340_608),
    "qwen2.5-3b": (3_085_938_688, 2_774_773_760),
    "qwen2.5-7b": (7_615_616_512, 6_525_621_760),
    "qwen2.5-14b": (14_770_033_664, 13_212_898_304),
    "qwen2.5-32b": (32_763_876_352, 31_206_740_992),
    "qwen2.5-72b": (72_706_203_648, 70_214_787_072),
}


@pytest.mark.parametrize("name", SPEC_COUNTS)
def test_preset_parameter_counts(name):
    """count_params of every preset equals the spec table. Building the abstract params of the 80-layer
    preset takes ~9 s, so all but the smallest are counted from 1- and 2-layer copies (linear in layers)."""
    config = PRESETS[name]
    if name == "qwen2.5-0.5b":
        counts = count_params(config)
    else:
        one, two = (np.array(count_params(config.replace(num_hidden_layers=n, max_window_layers=n)))
                    for n in (1, 2))
        counts = tuple(int(x) for x in one + (two - one) * (config.num_hidden_layers - 1))
    assert counts == SPEC_COUNTS[name]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_attention_heads=14, num_key_value_heads=4), "divisible by model.num_key_value_heads"),
    (dict(hidden_size=100, num_attention_heads=14, num_key_value_heads=2), "hidden_size"),
    (dict(hidden_size=42, num_attention_heads=2, num_key_value_heads=2), "head_dim must be even"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(dtype="float64"), "model.dtype"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "not supported"),
    (dict(rope_scaling={"rope_type": "yarn"}), "factor"),
    (dict(use_sliding_window=True, sliding_window=0), "sliding_window"),
])
def test_config_validation_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**kwargs)


def test_config_from_hf_dict_errors():
    with pytest.raises(UserError, match="unsupported model_type 'llama'"):
        ModelConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(UserError, match="hidden_act"):
        ModelConfig.from_hf_dict({"model_type": "qwen2", "hidden_act": "gelu"})
