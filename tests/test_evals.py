"""Long-context evals (`qwenjax eval passkey|ppl-by-position`): the chunked prefill equals a full forward
and qwenjax.generate, the passkey prompts have the asked length with the key at the asked depth, the scoring
is right (an oracle reading the key from the prompt scores 1.0, wrong digits 0.0), and both commands print
well-formed JSON and write a PNG from a tiny random model; bad input is one line and exit 2."""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import generate, model_io
from qwenjax.config import ModelConfig
from qwenjax.evals import forward, passkey
from qwenjax.evals.checkpoint import apply_overrides
from qwenjax.model import init_params, logits

# vocab 400 fits the sentencepiece model below; max_position_embeddings 256 so 384 is "beyond"
CONFIG = ModelConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
                     max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True)


@pytest.fixture(autouse=True)
def _full_precision_matmuls(full_precision_matmuls):
    yield


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, 1)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import qwenjax.config
    import qwenjax.model
    from qwenjax.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("sp")
    corpus = [shutil.copy(m.__file__, folder) for m in (qwenjax.config, qwenjax.model)]
    return train_tokenizer(corpus, folder / "tok", 400)


@pytest.fixture(scope="module")
def tokenizer(sp_model):
    from qwenjax.data.tokenizer import load_tokenizer

    return load_tokenizer(sp_model)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, params, sp_model):
    folder = tmp_path_factory.mktemp("model")
    model_io.save_model(folder, CONFIG, params)
    shutil.copy(sp_model, folder)
    return folder


def test_chunked_prefill_equals_full_forward_and_generate(params):
    rng = np.random.default_rng(0)
    seq_BL = rng.integers(0, CONFIG.vocab_size, size=(2, 71))
    full = jax.nn.log_softmax(logits(CONFIG, params, seq_BL[:, :-1]), -1)
    expected = -jnp.take_along_axis(full, jnp.asarray(seq_BL[:, 1:])[..., None], -1)[..., 0]
    got = forward.token_losses(CONFIG, params, jnp.asarray(seq_BL), chunk=16)  # a head of 70 % 16, 4 chunks
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    out = forward.greedy_continuations(CONFIG, params, jnp.asarray(seq_BL[:, :50]), new_tokens=5, chunk=16)
    for b in range(2):
        assert out[b].tolist() == generate.generate(CONFIG, params, seq_BL[b, :50].tolist(), max_new_tokens=5)


def test_parse_lengths_and_depths():
    assert passkey.parse_lengths("2k,1k, 4096,1M,32k,1k") == [1024, 2048, 4096, 32768, 1024**2]
    assert passkey.parse_lengths("1.5k") == [1536]
    assert passkey.parse_depths("1,0,0.25") == [0.0, 0.25, 1.0]
    assert [passkey.format_length(n) for n in (1024, 1536, 1024**2, 1000)] == ["1k", "1536", "1M", "1000"]
    from qwenjax.errors import UserError

    for bad in ("", "1x", "k", "0", "-1k", "1.7"):
        with pytest.raises(UserError, match="--lengths"):
            passkey.parse_lengths(bad)
    for bad in ("1.5", "-0.1", "a", "nan"):
        with pytest.raises(UserError, match="--depths"):
            passkey.parse_depths(bad)
    assert passkey.answer_of(" 68461. Remember") == "68461" and passkey.answer_of("x 1") is None


def test_prompts_have_the_length_and_the_key_at_the_depth(tokenizer):
    builder = passkey.PromptBuilder(tokenizer)
    key_ids = builder.key_ids("68461")
    for depth in (0.0, 0.5, 1.0):
        ids = builder.build(300, depth, "68461")
        assert len(ids) == 300
        at = next(i for i in range(300) if ids[i:i + len(key_ids)] == key_ids)
        filler = 300 - len(builder.head) - len(key_ids) - len(builder.question)
        assert at == len(builder.head) + round(depth * filler)
        assert ids[-len(builder.question):] == builder.question
        assert "The pass key is 68461. Remember it." in tokenizer.decode(ids)


def _oracle(tokenizer, change=lambda key: key):
    """A decoder that reads the key from each prompt and answers `change(key)`."""
    def decode(tokens_BL, new_tokens):
        out = []
        for row in tokens_BL:
            key = re.search(r"pass key is (\d+)\. Remember", tokenizer.decode(row.tolist())).group(1)
            ids = tokenizer.encode(" " + change(key) + ". Remember")[:new_tokens]
            out.append(ids + [tokenizer.eos_id] * (new_tokens - len(ids)))
        return np.asarray(out)
    return decode


@pytest.mark.parametrize(("change", "accuracy"), [(lambda k: k, 1.0), (lambda k: str(int(k) + 1), 0.0),
                                                  (lambda k: k + "7", 0.0), (lambda k: "", 0.0)],
                         ids=["oracle", "wrong-digits", "extra-digit", "no-digits"])
def test_scoring_with_an_oracle(tokenizer, change, accuracy):
    table = passkey.run_passkey(_oracle(tokenizer, change), tokenizer, lengths=[200, 300], depths=[0, 0.5, 1],
                                trials=3, batch_size=4, max_position_embeddings=256)
    assert table["accuracy"] == accuracy
    assert {c["accuracy"] for c in table["cells"]} == {accuracy} and len(table["cells"]) == 6
    assert table["beyond_max_position_embeddings"] == [300] and "300" in table["note"]
    assert len(set(table["keys"])) == 3 and all(len(k) == 5 for k in table["keys"])


def test_cli_passkey_on_a_tiny_model(tmp_path, run_cli, model_dir, tokenizer, monkeypatch):
    before = forward.TRACE_COUNTS["greedy"]
    out_png = tmp_path / "plots" / "pk.png"
    status, out, err = run_cli("eval", "passkey", "--checkpoint", model_dir, "--lengths", "256,384",
                               "--depths", "0,0.5,1", "--trials", 2, "--batch-size", 4, "--chunk", 64,
                               "--out", out_png)
    assert status == 0, err
    table = json.loads(out)
    assert forward.TRACE_COUNTS["greedy"] - before == 2  # one compile per length, not per batch or trial
    assert table["lengths"] == [256, 384] and table["depths"] == [0.0, 0.5, 1.0] and table["trials"] == 2
    assert len(table["cells"]) == 6
    for cell in table["cells"]:
        assert 0 <= cell["accuracy"] <= 1 and cell["trials"] == 2 and len(cell["answers"]) == 2
        assert isinstance(cell["example"], str)
        assert cell["beyond_max_position_embeddings"] == (cell["length"] > 256)
    assert table["beyond_max_position_embeddings"] == [384] and table["max_position_embeddings"] == 256
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and table["plot"] == str(out_png)

    # the same command with an oracle in place of the model's decoder: accuracy 1.0 through the CLI
    monkeypatch.setattr(passkey, "model_decoder", lambda *a, **k: _oracle(tokenizer))
    status, out, err = run_cli("eval", "passkey", "--checkpoint", model_dir, "--lengths", "256",
                               "--depths", "0,1", "--trials", 2, "--out", tmp_path / "o.png",
                               "--filler", generate.__file__)  # filler from a corpus file
    assert status == 0, err
    assert json.loads(out)["accuracy"] == 1.0


def test_cli_ppl_by_position_with_overrides(tmp_path, run_cli, model_dir):
    import qwenjax.model

    data = tmp_path / "docs.jsonl"
    text = open(qwenjax.model.__file__).read()
    data.write_text("".join(json.dumps({"text": text[i:i + 3000]}) + "\n" for i in range(0, 12000, 3000)))
    run = tmp_path / "run"  # a run directory: config.yaml and a model/ with its tokenizer
    shutil.copytree(model_dir, run / "model")
    (run / "config.yaml").write_text("model: {}\n")
    out_png = tmp_path / "ppl.png"
    yarn = "model.rope_scaling={rope_type: yarn, factor: 2, original_max_position_embeddings: 256}"
    status, out, err = run_cli("eval", "ppl-by-position", "--checkpoint", run, "--data", data, "--length", 300,
                               "--bucket", 128, "--sequences", 3, "--batch-size", 2, "--chunk", 64,
                               "--out", out_png, yarn)
    assert status == 0, err
    table = json.loads(out)
    assert [(b["start"], b["end"]) for b in table["buckets"]] == [(0, 128), (128, 256), (256, 300)]
    assert all(np.isfinite(b["loss"]) and b["loss"] > 0 for b in table["buckets"])
    assert table["sequences"] == 3 and table["tokens"] == 900 and table["beyond_max_position_embeddings"]
    assert table["rope_scaling"]["rope_type"] == "yarn" and table["rope_scaling"]["factor"] == 2
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_overrides():
    config = apply_overrides(CONFIG, ["model.rope_theta=1e6", "model.rope_scaling.factor=4",
                                      "model.rope_scaling.rope_type=yarn"])
    assert config.rope_theta == 1e6 and config.rope_scaling_dict == {"factor": 4, "rope_type": "yarn"}
    assert apply_overrides(config, ["model.rope_scaling=null"]).rope_scaling is None


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--lengths", "1x"], "--lengths: '1x'"),
    (["--depths", "0,1.5"], "outside [0, 1]"),
    (["--lengths", "16"], "shorter than the passkey prompt"),
    (["model.hidden_size=8"], "cannot be overridden"),
    (["train.steps=8"], "only model.KEY=VALUE"),
    (["model.rope_scaling={rope_type: nope, factor: 2}"], "not supported"),
    (["--trials", "0"], "--trials"),
])
def test_cli_bad_input_is_one_line(run_cli, model_dir, tmp_path, argv, fragment):
    status, out, err = run_cli("eval", "passkey", "--checkpoint", model_dir, "--out", tmp_path / "x.png", *argv)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


def test_cli_missing_checkpoint_and_data(run_cli, tmp_path, model_dir):
    status, _, err = run_cli("eval", "passkey", "--checkpoint", tmp_path / "nope")
    assert status == 2 and "is not a folder" in err and len(err.strip().splitlines()) == 1
    status, _, err = run_cli("eval", "ppl-by-position", "--checkpoint", tmp_path, "--data", tmp_path / "x.txt",
                             "--length", 64)
    assert status == 2 and len(err.strip().splitlines()) == 1
    (tmp_path / "d.txt").write_text("some text")
    status, _, err = run_cli("eval", "ppl-by-position", "--checkpoint", tmp_path, "--data", tmp_path / "d.txt",
                             "--length", 64)
    assert status == 2 and "holds no qwenjax model" in err
