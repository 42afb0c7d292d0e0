"""Tokenizer training/loading (sentencepiece BPE + byte fallback, HF tokenizer.json) and its CLI."""

from __future__ import annotations

import json
import random

import pytest

from qwenjax.data.tokenizer import (
    CONTROL_TOKENS,
    EOS_PIECE,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from qwenjax.errors import UserError

WORDS = ["value", "index", "result", "name", "items", "count", "total", "data", "self", "config", "path"]


def make_code_doc(rng: random.Random, n_funcs: int = 3) -> str:
    out = []
    for _ in range(n_funcs):
        a, b = rng.sample(WORDS, 2)
        out.append(f"def {a}_{b}({a}, {b}=None):\n")
        out.append(f'    """Return the {a} of {b}."""\n')
        for _ in range(rng.randint(1, 4)):
            c = rng.choice(WORDS)
            out.append(f"    if {c} is not None and {c} > {rng.randint(0, 999)}:\n")
            out.append(f"        {c} = {a} + {rng.randint(1, 99)}  # adjust {c}\n")
        out.append(f"    return {a}\n\n")
    return "".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokcorpus")
    rng = random.Random(0)
    for i in range(12):
        (d / f"mod{i}.py").write_text(make_code_doc(rng))
    return d


@pytest.fixture(scope="module")
def sp_model(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer(corpus, out, 400)


def test_train_writes_model_and_vocab_atomically(sp_model):
    assert sp_model.name == "tok.model" and sp_model.is_file()
    assert sp_model.with_suffix(".vocab").is_file()
    assert sorted(p.name for p in sp_model.parent.iterdir()) == ["tok.model", "tok.vocab"]  # no temp files


def test_round_trip_keeps_code_whitespace(sp_model):
    tok = load_tokenizer(sp_model)
    assert tok.vocab_size == 400
    text = "def f(x):\n    return  x +   12345\n\n\n\tpass  \n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "a"]) == [tok.encode(text), tok.encode("a")]


def test_control_tokens_are_single_ids(sp_model):
    tok = load_tokenizer(sp_model)
    ids = [tok.encode(t) for t in CONTROL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 3
    assert tok.encode(EOS_PIECE) == [tok.eos_id]
    assert tok.id_to_piece(tok.eos_id) == EOS_PIECE
    text = "x = 1<|endoftext|><|im_start|>user"
    assert tok.decode(tok.encode(text)) == text


def test_byte_fallback_on_unseen_characters(sp_model):
    tok = load_tokenizer(sp_model)
    text = "名前 = '🎉ü'"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 0 not in ids  # never <unk>
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)


def test_training_errors(corpus, tmp_path):
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(corpus, tmp_path / "t", 100)
    with pytest.raises(UserError, match="does not exist"):
        train_tokenizer(tmp_path / "nope", tmp_path / "t", 400)
    with pytest.raises(UserError, match=r"too large for this corpus; use at most \d+"):
        train_tokenizer(corpus, tmp_path / "t", 50_000)
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(UserError, match="no text"):
        train_tokenizer([tmp_path / "blank.txt"], tmp_path / "t", 400)
    assert not list(tmp_path.glob("*.model"))


def test_load_errors(sp_model, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf \x00\x01\x02")
    with pytest.raises(UserError, match="not a valid sentencepiece model"):
        load_tokenizer(bad)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UserError, match="neither tokenizer.json nor"):
        load_tokenizer(empty_dir)


def test_load_from_folder_with_model(sp_model):
    tok = load_tokenizer(sp_model.parent)
    assert tok.vocab_size == 400
    assert tokenizer_fingerprint(sp_model.parent) == tokenizer_fingerprint(sp_model) == tok.fingerprint


def test_hf_tokenizer_json(corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(CONTROL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train([str(p) for p in sorted(corpus.glob("*.py"))], trainer)
    d = tmp_path / "qwen"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    tok = load_tokenizer(d)
    assert tok.eos_id == hf.token_to_id(EOS_PIECE)
    assert tok.encode("<|im_end|>") == [hf.token_to_id("<|im_end|>")]
    text = "def f(x):\n    return x  # ü\n"
    assert tok.decode(tok.encode(text)) == text
    fp = tok.fingerprint
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok2 = load_tokenizer(d)
    assert tok2.eos_id == 2 and tok2.fingerprint != fp
    assert tokenizer_fingerprint(d) == tok2.fingerprint
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(d)


def test_cli_train(corpus, tmp_path, monkeypatch, capsys):
    import qwenjax.cli as cli

    out = tmp_path / "sub" / "cli"
    args = ["tokenizer", "train", "--data", str(corpus), "--vocab-size", "400", "--out", str(out)]
    assert cli.main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("wrote ") and "\n" not in line
    assert load_tokenizer(out.with_suffix(".model")).vocab_size == 400

    assert cli.main(["tokenizer", "train", "--data", str(tmp_path / "nope"), "--vocab-size", "400",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qwenjax: error:") and "does not exist" in err and "\n" not in err
    assert cli.main(["tokenizer", "train", "--data", str(corpus)]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
    assert cli.main(["tokenizer"]) == 2
