"""KV-cache decoding (`qwenjax.generate`) and `qwenjax generate`."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import generate as gen
from qwenjax import hf
from qwenjax.config import ModelConfig
from qwenjax.errors import UserError
from qwenjax.model import init_params, logits

_forward = jax.jit(logits, static_argnums=0)


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """float32 matmuls at full precision on any backend (GPUs default to TF32): the tolerances hold there."""
    with jax.default_matmul_precision("highest"):
        yield

# One config (and so one set of compiled prefill / decode steps) for most tests; head_dim is explicit so the
# config survives a trip through a HF config.json unchanged. vocab 400 fits the sentencepiece model below.
CONFIG = ModelConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
                     initializer_range=0.2, tie_word_embeddings=True)
SLIDING = CONFIG.replace(num_key_value_heads=1, use_sliding_window=True, sliding_window=5,
                         max_window_layers=1)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, 1)


SCANNED = {"plain-scanned": CONFIG.replace(scan_layers=True),  # layers stacked, the cache scanned alongside
           "sliding-all-scanned": SLIDING.replace(max_window_layers=0, scan_layers=True)}


@pytest.mark.parametrize("sliding", [False, True, *SCANNED], ids=["plain", "sliding-window", *SCANNED])
def test_cached_logits_equal_full_forward_at_every_step(sliding, params):
    config = SCANNED.get(sliding, SLIDING if sliding else CONFIG)
    if sliding:
        params = init_params(config, 2)
    prompt = [3, 14, 15, 9, 26, 5, 35]
    steps = list(gen.stream(config, params, prompt, max_new_tokens=12))
    assert len(steps) == 12
    sequence = prompt + [s.token for s in steps]
    full = np.asarray(_forward(config, params, np.asarray([sequence])))[0]
    assert np.abs(full).max() > 1.0
    for i, step in enumerate(steps):
        expected = full[len(prompt) - 1 + i]
        assert np.abs(np.asarray(step.logits) - expected).max() < 1e-4, i
        assert step.token == int(np.argmax(expected))


def test_greedy_matches_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(attn_implementation="eager", **CONFIG.to_hf_dict())
    model = transformers.Qwen2ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    config, hf_params = hf.load_hf(tmp_path / "hf")
    prompt = [5, 17, 2, 60, 33]

    def hf_generate(n, eos):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=eos,
                                 pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        return out[0, len(prompt):].tolist()

    ref = hf_generate(20, None)
    assert len(ref) == 20 and len(set(ref)) > 3
    assert gen.generate(config, hf_params, prompt, max_new_tokens=20) == ref
    eos = ref[6]  # stop at the first occurrence of this token, EOS included, like transformers
    ref_eos = hf_generate(20, eos)
    assert ref_eos == ref[:ref.index(eos) + 1]
    assert gen.generate(config, hf_params, prompt, max_new_tokens=20, eos_id=eos) == ref_eos


def test_no_recompilation_per_token(params):
    def traces():
        return gen.TRACE_COUNTS["prefill"], gen.TRACE_COUNTS["decode"]

    before = traces()
    assert len(gen.generate(CONFIG, params, [1, 2, 3], max_new_tokens=40)) == 40
    first = traces()
    assert first[0] - before[0] <= 1 and first[1] - before[1] <= 1  # 0 if an earlier test compiled them
    # other prompt lengths and token budgets in the same buckets: nothing new to compile
    gen.generate(CONFIG, params, [4, 5, 6, 7, 8, 9, 10], max_new_tokens=30)
    gen.generate(CONFIG, params, list(range(50)), max_new_tokens=10)
    assert traces() == first
    # sampling is a second variant of each step, whatever the temperature, top-p and seed
    gen.generate(CONFIG, params, [4, 5], max_new_tokens=30, temperature=0.7, top_p=0.9, rng=1)
    sampled = traces()
    assert sampled[0] - first[0] <= 1 and sampled[1] - first[1] <= 1
    gen.generate(CONFIG, params, [4, 5, 6], max_new_tokens=20, temperature=1.3, top_p=0.5, rng=2)
    assert traces() == sampled
    assert gen._decode_step._cache_size() == gen.TRACE_COUNTS["decode"]


def test_top_p_keeps_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits_V = jnp.log(jnp.asarray(probs, jnp.float32))
    keys = jax.random.split(jax.random.key(0), 4000)

    sample = jax.jit(jax.vmap(lambda k, t, p: gen.sample_token(logits_V, k, t, p, greedy=False),
                              in_axes=(0, None, None)))

    def draw(temperature, top_p):
        return np.bincount(np.asarray(sample(keys, temperature, top_p)), minlength=4) / len(keys)

    freq = draw(1.0, 0.7)  # nucleus {0, 1} (0.5 < 0.7 <= 0.8), renormalised to 0.625 / 0.375
    assert freq[2] == freq[3] == 0
    assert abs(freq[0] - 0.625) < 0.03
    freq = draw(1.0, 1.0)
    assert np.abs(freq - probs).max() < 0.03
    freq = draw(1.0, 0.3)  # only the top token
    assert freq[0] == 1
    assert np.abs(draw(2.0, 1.0) - np.sqrt(probs) / np.sqrt(probs).sum()).max() < 0.03  # temperature
    assert int(gen.sample_token(logits_V, keys[0], 1.0, 1.0, greedy=True)) == 0


def test_sampling_is_reproducible_and_stays_in_the_nucleus(params):
    prompt = [7, 8, 9]
    kw = dict(max_new_tokens=16, temperature=0.8, top_p=0.6)
    first = gen.generate(CONFIG, params, prompt, rng=11, **kw)
    assert gen.generate(CONFIG, params, prompt, rng=11, **kw) == first
    assert gen.generate(CONFIG, params, prompt, rng=jax.random.key(11), **kw) == first
    assert gen.generate(CONFIG, params, prompt, rng=12, **kw) != first
    for step in gen.stream(CONFIG, params, prompt, rng=5, **kw):
        p = np.asarray(jax.nn.softmax(step.logits / 0.8))
        order = np.argsort(-p)
        nucleus = order[: int(np.searchsorted(np.cumsum(p[order]), 0.6)) + 1]
        assert step.token in nucleus


def test_argument_errors(params):
    with pytest.raises(UserError, match="empty"):
        gen.stream(CONFIG, params, [], max_new_tokens=3)
    with pytest.raises(UserError, match="top_p"):
        gen.generate(CONFIG, params, [1], max_new_tokens=3, temperature=1.0, top_p=0.0)
    with pytest.raises(UserError, match="token ids"):
        gen.generate(CONFIG, params, [CONFIG.vocab_size], max_new_tokens=3)
    assert gen.generate(CONFIG, params, [1], max_new_tokens=0) == []


# ----------------------------------------------------------------------------------------------------------
# The CLI


def test_cli_generate_with_sentencepiece_and_tokenizer_json(tmp_path, run_cli, params):
    import qwenjax.config
    import qwenjax.model
    from qwenjax.data.tokenizer import load_tokenizer, train_tokenizer

    corpus = [shutil.copy(m.__file__, tmp_path) for m in (qwenjax.config, qwenjax.model)]
    sp_model = train_tokenizer(corpus, tmp_path / "sp" / "tok", 400)
    sp = load_tokenizer(sp_model)
    assert sp.vocab_size == CONFIG.vocab_size
    hf.save_hf(tmp_path / "hf", CONFIG, params)
    status, _, err = run_cli("convert", "--from-hf", tmp_path / "hf", "--to", tmp_path / "model")
    assert status == 0, err

    prompt = "def forward(self, x):"
    sampling = dict(temperature=0.9, top_p=0.9)
    expected = gen.generate(CONFIG, params, sp.encode(prompt), max_new_tokens=8, eos_id=sp.eos_id, rng=3,
                            **sampling)
    expected = sp.decode([t for t in expected if t != sp.eos_id])
    status, out, err = run_cli("generate", "--checkpoint", tmp_path / "model", "--prompt", prompt,
                               "--max-new-tokens", 8, "--tokenizer", sp_model, "--seed", 3,
                               "--temperature", 0.9, "--top-p", 0.9)
    assert status == 0, err
    assert out == expected + "\n"

    # a HF folder with its own tokenizer.json (a word-level one built here), found without --tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "<unk>", "the", "cat", "sat", "on", "a", "mat", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    status, out, err = run_cli("generate", "--checkpoint", tmp_path / "hf", "--prompt", "the cat sat",
                               "--max-new-tokens", 5, "--temperature", 0.9, "--top-p", 0.9, "--seed", 3)
    assert status == 0, err
    assert out.endswith("\n") and len(out.splitlines()) == 1


def test_cli_generate_errors(tmp_path, run_cli):
    def expect(argv, fragment):
        status, _, err = run_cli(*argv)
        assert status == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err

    expect(["generate", "--checkpoint", tmp_path / "none", "--prompt", "x"], "is not a folder")
    (tmp_path / "empty").mkdir()
    expect(["generate", "--checkpoint", tmp_path / "empty", "--prompt", "x"], "no tokenizer")
    expect(["generate", "--checkpoint", tmp_path / "empty", "--prompt", "x",
            "--tokenizer", tmp_path / "t.model"], "does not exist")
    expect(["generate", "--checkpoint", tmp_path, "--prompt", "x", "--max-new-tokens", 0], "--max-new-tokens")
