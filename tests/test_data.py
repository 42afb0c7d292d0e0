"""Corpus resolution, document readers, the token cache, packing, sharding, mixing and eval batches."""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest

import qwenjax.data as data
import qwenjax.data.cache as data_cache
from qwenjax.data import (
    BATCH_DTYPES,
    BATCH_KEYS,
    batch_shapes,
    build_token_cache,
    cache_key,
    check_batch,
    default_corpus_files,
    iter_documents,
    make_eval_batches,
    make_train_iterator,
    pack_windows,
    resolve_files,
    stdlib_corpus,
)
from qwenjax.data.tokenizer import load_tokenizer, train_tokenizer
from qwenjax.errors import UserError

WORDS = ["value", "index", "result", "name", "items", "count", "total", "data", "self", "config", "path"]


def code_doc(rng: random.Random, tag: int) -> str:
    lines = [f"# module {tag}\n"]
    for _ in range(rng.randint(2, 4)):
        a, b = rng.sample(WORDS, 2)
        lines.append(f"def {a}_{b}_{tag}({a}, {b}=None):\n")
        for _ in range(rng.randint(1, 3)):
            lines.append(f"    {rng.choice(WORDS)} = {a} + {rng.randint(0, 999)}\n")
        lines.append(f"    return {b}\n\n")
    return "".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    (d / "pkg").mkdir()
    for i in range(40):
        (d / ("pkg" if i % 2 else ".") / f"m{i:02d}.py").write_text(code_doc(rng, i))
    return d


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """A second source: 30 JSONL documents in a different style (prose)."""
    d = tmp_path_factory.mktemp("records")
    rng = random.Random(2)
    with open(d / "docs.jsonl", "w") as fh:
        for i in range(30):
            text = " ".join(rng.choice(WORDS).upper() for _ in range(rng.randint(20, 60)))
            fh.write(json.dumps({"text": f"Doc {i}: {text}."}) + "\n")
    return d / "docs.jsonl"


@pytest.fixture(scope="module")
def tok_path(corpus, records, tmp_path_factory):
    return train_tokenizer(resolve_files(corpus) + [records], tmp_path_factory.mktemp("tok") / "tok", 400)


@pytest.fixture(scope="module")
def cache(corpus, tok_path, tmp_path_factory):
    return build_token_cache(corpus, tok_path, tmp_path_factory.mktemp("cache"), heldout_fraction=0.1)


@pytest.fixture(scope="module")
def cache_b(records, tok_path, tmp_path_factory):
    return build_token_cache([records], tok_path, tmp_path_factory.mktemp("cache_b"), heldout_fraction=0.1)


# ---------------------------------------------------------------- files and documents


def test_resolve_files_forms(corpus):
    files = resolve_files(corpus)
    assert len(files) == 40 and files == resolve_files(corpus)
    assert files[0] == corpus / "m00.py" and files[-1] == corpus / "pkg" / "m39.py"  # sorted walk
    assert resolve_files(corpus / "m00.py") == [corpus / "m00.py"]
    assert len(resolve_files(str(corpus / "**" / "*.py"))) == 40
    assert len(resolve_files(str(corpus / "pkg" / "*.py"))) == 20


def test_resolve_files_errors(tmp_path, caplog):
    with pytest.raises(UserError, match="does not exist"):
        resolve_files(tmp_path / "nothing")
    with pytest.raises(UserError, match="no files match"):
        resolve_files(str(tmp_path / "*.nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no files"):
        resolve_files(tmp_path / "empty")
    b = tmp_path / "bin"
    b.mkdir()
    (b / "a.bin").write_bytes(b"\x00\x01\x02" * 100)
    (b / "b.txt").write_bytes(b"\xff\xfe not utf8 \xc3")
    with pytest.raises(UserError, match=r"only binary files \(2\)"):
        resolve_files(b)
    with pytest.raises(UserError, match="binary"):
        resolve_files(b / "a.bin")
    (b / "ok.md").write_text("# hello\n")
    with caplog.at_level(logging.WARNING, logger="qwenjax.data"):
        assert resolve_files(b) == [b / "ok.md"]
    assert "skipped 2 binary" in caplog.text


def test_jsonl_json_and_parquet_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n"three"\n')
    (tmp_path / "b.json").write_text(json.dumps([{"text": "four"}, "five"], indent=1))
    pq.write_table(pa.table({"text": ["six", None, "seven"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("eight\nstill eight\n")
    docs = list(iter_documents(resolve_files(tmp_path)))
    expected = ["one", "two", "three", "four", "five", "six", "seven", "eight\nstill eight\n"]
    assert [t for _, t in docs] == expected
    assert docs[0][0] == "a.jsonl#0" and docs[-1][0] == "d.txt#0"
    assert len({k for k, _ in docs}) == len(docs)

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl line 2: record has no 'text'"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    (tmp_path / "e.json").write_text('{"text": "x"}\n{"text": "y"}\n')
    assert [t for _, t in iter_documents([tmp_path / "e.json"])] == ["x", "y"]
    (tmp_path / "cfg.json").write_text('{\n "name": "x"\n}\n')
    with pytest.raises(UserError, match="cfg.json: record has no 'text' field"):
        list(iter_documents([tmp_path / "cfg.json"]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="no 'text' column"):
        list(iter_documents([tmp_path / "bad.parquet"]))


def test_default_corpus_is_stdlib_code():
    root = stdlib_corpus()
    assert (root / "os.py").is_file()
    files = default_corpus_files(max_bytes=200_000)
    assert files and all(f.suffix == ".py" for f in files)
    assert all("site-packages" not in f.parts for f in files)
    assert sum(f.stat().st_size for f in files) >= 200_000
    assert files == default_corpus_files(max_bytes=200_000)


# ---------------------------------------------------------------- token cache


def test_cache_contents(cache, tok_path, corpus):
    tok = load_tokenizer(tok_path)
    assert cache.vocab_size == 400 and cache.eos_id == tok.eos_id
    assert cache.train_tokens.dtype == np.uint16 and isinstance(cache.train_tokens, np.memmap)
    assert sorted(p.name for p in cache.path.iterdir()) == ["heldout.npy", "meta.json", "train.npy"]
    meta = cache.meta
    assert meta["num_docs"]["train"] + meta["num_docs"]["heldout"] == 40
    assert meta["num_docs"]["heldout"] >= 1 and meta["num_files"] == 40
    for split in ("train", "heldout"):
        toks = cache.tokens(split)
        assert toks[-1] == cache.eos_id and int((toks == cache.eos_id).sum()) == meta["num_docs"][split]
    # documents are split by document: decode each one and compare with the corpus files
    originals = {f.read_text() for f in resolve_files(corpus)}

    def docs(toks):
        ends = np.flatnonzero(np.asarray(toks) == cache.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        return [tok.decode(toks[s:e]) for s, e in zip(starts, ends, strict=True)]

    train_docs, held_docs = docs(cache.train_tokens), docs(cache.heldout_tokens)
    assert set(train_docs) | set(held_docs) == originals
    assert not set(train_docs) & set(held_docs)


def test_cache_reused_not_retokenized(cache, corpus, tok_path, monkeypatch):
    root = cache.path.parent
    mtime = (cache.path / "train.npy").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(data_cache, "_tokenize_into", boom)
    again = build_token_cache(corpus, tok_path, root, heldout_fraction=0.1)
    assert again.path == cache.path and not again.built and cache.built
    assert (again.path / "train.npy").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.train_tokens, cache.train_tokens)
    files = resolve_files(corpus)
    assert cache_key(files, tok_path, 0.1) != cache_key(files, tok_path, 0.2)
    assert cache_key(files, tok_path, 0.1) != cache_key(files[:-1], tok_path, 0.1)
    assert cache_key(files, tok_path, 0.1) != cache_key(files, tok_path, 0.1, max_bytes=1000)


def test_cache_build_is_atomic(corpus, tok_path, tmp_path, monkeypatch):
    real = data_cache._tokenize_into

    def killed(out, *a, **k):
        real(out, *a, **k)
        raise KeyboardInterrupt  # dies after writing the arrays, before meta.json / rename

    monkeypatch.setattr(data_cache, "_tokenize_into", killed)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(corpus, tok_path, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_race_loser_uses_winner(corpus, tok_path, tmp_path, monkeypatch):
    winner = build_token_cache(corpus, tok_path, tmp_path / "winner")
    real = data_cache._tokenize_into

    def slow(out, *a, **k):  # another worker finishes first while we tokenise
        meta = real(out, *a, **k)
        final = tmp_path / "root" / winner.path.name
        os.rename(winner.path, final)
        return meta

    monkeypatch.setattr(data_cache, "_tokenize_into", slow)
    loser = build_token_cache(corpus, tok_path, tmp_path / "root")
    assert not loser.built and loser.path == tmp_path / "root" / winner.path.name
    assert [p.name for p in (tmp_path / "root").iterdir()] == [winner.path.name]


def test_stale_temp_dirs_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-abc-{socket.gethostname()}-{dead.pid}-0000abcd"
    live = tmp_path / f".tmp-abc-{socket.gethostname()}-{os.getppid()}-0000abcd"
    stale.mkdir()
    live.mkdir()
    data_cache._remove_stale_temps(tmp_path, "abc")
    assert not stale.exists() and live.exists()


def test_corrupt_cache_is_user_error(cache, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(cache.path, broken)
    (broken / "train.npy").write_bytes(b"junk")
    with pytest.raises(UserError, match="corrupt train.npy"):
        data.TokenCache(broken)
    (broken / "meta.json").unlink()
    with pytest.raises(UserError, match="incomplete"):
        data.TokenCache(broken)
    shutil.rmtree(broken)
    shutil.copytree(cache.path, broken)
    meta = json.loads((broken / "meta.json").read_text())
    del meta["eos_id"]
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="incomplete meta.json"):
        data.TokenCache(broken)


def test_unigram_entropy(cache):
    h = cache.unigram_entropy()
    counts = np.bincount(np.asarray(cache.train_tokens), minlength=cache.vocab_size)
    p = counts[counts > 0] / counts.sum()
    assert h == pytest.approx(float(-(p * np.log(p)).sum()))
    assert 1.0 < h < math.log(cache.vocab_size)
    assert cache.unigram_entropy("heldout") > 0


# ---------------------------------------------------------------- packing and batches


def test_pack_windows_rule():
    E = 9
    w = np.array([[5, 6, E, 7, E, E, 8, 1, 2]])
    b = pack_windows(w, E)
    np.testing.assert_array_equal(b["inputs"], [[5, 6, E, 7, E, E, 8, 1]])
    np.testing.assert_array_equal(b["targets"], [[6, E, 7, E, E, 8, 1, 2]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 3, 4, 4]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 0, 0, 1]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 1, 0, 0, 1, 1]])
    assert b["loss_mask"].dtype == np.float32 and b["inputs"].dtype == np.int32
    check_batch(b, 1, 8)


def test_batch_schema():
    assert BATCH_KEYS == ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    assert batch_shapes(4, 16) == {k: ((4, 16), dt) for k, dt in BATCH_DTYPES.items()}
    one_doc = pack_windows(np.arange(18).reshape(2, 9), None)  # eos_id None: each row is one document
    check_batch(one_doc, 2, 8)
    np.testing.assert_array_equal(one_doc["segment_ids"], np.ones((2, 8)))
    np.testing.assert_array_equal(one_doc["positions"], np.tile(np.arange(8), (2, 1)))
    np.testing.assert_array_equal(one_doc["loss_mask"], np.ones((2, 8)))
    with pytest.raises(ValueError, match="expected int32"):
        check_batch({**one_doc, "positions": one_doc["positions"].astype(np.int64)})
    with pytest.raises(ValueError, match=r"expected int32\[3, 8\]"):
        check_batch(one_doc, rows=3)
    with pytest.raises(ValueError, match="keys"):
        check_batch({k: v for k, v in one_doc.items() if k != "loss_mask"})


def test_data_package_layers():
    """`import qwenjax.data` stays JAX-free, and the tokenizer imports only the corpus stage."""
    code = "import sys, qwenjax.data; print(sorted({'jax', 'grain'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    tree = ast.parse(open(data.tokenizer.__file__).read())
    internal = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and n.module and n.module.startswith("qwenjax.data")}
    assert internal == {"qwenjax.data.corpus"}


def _check_batch(b, cache, seq_len, rows):
    check_batch(b, rows, seq_len)
    assert set(b) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert b[k].shape == (rows, seq_len)
        assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    is_eos = b["inputs"] == cache.eos_id
    np.testing.assert_array_equal(b["loss_mask"], (~is_eos).astype(np.float32))
    for r in range(rows):
        seg, pos = 1, 0
        for t in range(seq_len):
            assert b["segment_ids"][r, t] == seg and b["positions"][r, t] == pos
            if is_eos[r, t]:
                seg, pos = seg + 1, 0
            else:
                pos += 1


def _window_set(tokens, seq_len):
    toks = np.asarray(tokens)
    n = (len(toks) - 1) // seq_len
    return {toks[i * seq_len:i * seq_len + seq_len + 1].tobytes() for i in range(n)}


def _row_bytes(b, r, dtype):
    return np.concatenate([b["inputs"][r], b["targets"][r, -1:]]).astype(dtype).tobytes()


def test_train_batches_packing_and_epochs(cache):
    seq_len = 16
    it = make_train_iterator([cache], [1.0], seq_len=seq_len, global_batch_size=1, seed=3, prefetch=0)
    n = cache.num_windows(seq_len)
    windows = _window_set(cache.train_tokens, seq_len)
    first_epoch = [_row_bytes(it.batch_at(s), 0, cache.train_tokens.dtype) for s in range(n)]
    assert set(first_epoch) == windows and len(set(first_epoch)) == n  # a permutation of all windows
    second = [_row_bytes(it.batch_at(s), 0, cache.train_tokens.dtype) for s in range(n, 2 * n)]
    assert set(second) == windows and second != first_epoch  # reshuffled
    it = make_train_iterator(cache, seq_len=seq_len, global_batch_size=8, seed=3)
    n_eos = 0
    for _ in range(6):
        b = next(it)
        _check_batch(b, cache, seq_len, 8)
        assert all(_row_bytes(b, r, cache.train_tokens.dtype) in windows for r in range(8))
        n_eos += int((b["inputs"] == cache.eos_id).sum())
    assert n_eos > 0  # documents really are packed across rows


def test_determinism_and_state_round_trip(cache):
    kw = dict(seq_len=32, global_batch_size=4)
    a = make_train_iterator([cache], [1.0], seed=7, **kw)
    b = make_train_iterator([cache], [1.0], seed=7, **kw)
    c = make_train_iterator([cache], [1.0], seed=8, **kw)
    xa, xb, xc = [next(a) for _ in range(3)], [next(b) for _ in range(3)], [next(c) for _ in range(3)]
    for u, v in zip(xa, xb, strict=True):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(u[k], v[k])
    assert any(not np.array_equal(u["inputs"], w["inputs"]) for u, w in zip(xa, xc, strict=True))

    state = json.loads(json.dumps(a.get_state()))
    assert state["step"] == 3
    expected = [next(a) for _ in range(4)]
    a.set_state(state)  # same object
    fresh = make_train_iterator([cache], [1.0], seed=7, **kw)  # a restarted process
    fresh.set_state(state)
    for e in expected:
        for got in (next(a), next(fresh)):
            for k in BATCH_KEYS:
                np.testing.assert_array_equal(got[k], e[k])
            np.testing.assert_array_equal(fresh.batch_at(3)["inputs"], expected[0]["inputs"])
    with pytest.raises(UserError, match="different data configuration"):
        c.set_state(state)
    with pytest.raises(UserError, match="not a data-iterator state"):
        c.set_state({"step": 1})
    a.close()


def test_process_shards_union_is_global_batch(cache):
    kw = dict(seq_len=16, global_batch_size=6, seed=1)
    single = make_train_iterator([cache], **kw)
    shards = [make_train_iterator([cache], process_index=i, process_count=3, **kw) for i in range(3)]
    for _ in range(3):
        g = next(single)
        parts = [next(s) for s in shards]
        for k in BATCH_KEYS:
            assert parts[0][k].shape == (2, 16)
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])
    state = shards[1].get_state()
    single.set_state(state)  # the state does not depend on the process layout


def test_mixing_weights(cache, cache_b):
    seq_len = 8
    dtype = cache.train_tokens.dtype
    wa, wb = _window_set(cache.train_tokens, seq_len), _window_set(cache_b.train_tokens, seq_len)
    it = make_train_iterator([cache, cache_b], [1.0, 3.0], seq_len=seq_len, global_batch_size=16, seed=0)
    n_a = n_b = 0
    for _ in range(25):
        b = next(it)
        for r in range(16):
            x = _row_bytes(b, r, dtype)
            n_a += x in wa
            n_b += x in wb and x not in wa
    assert n_a + n_b == 400
    assert abs(n_a / 400 - 0.25) < 0.05


def test_train_iterator_errors(cache, cache_b, tmp_path):
    kw = dict(seq_len=16, global_batch_size=4, seed=0)
    with pytest.raises(UserError, match="weight 0.0"):
        make_train_iterator([cache, cache_b], [1.0, 0.0], **kw)
    with pytest.raises(UserError, match="2 mixing weights for 1"):
        make_train_iterator([cache], [1.0, 1.0], **kw)
    with pytest.raises(UserError, match="too long"):
        make_train_iterator([cache], seq_len=10**7, global_batch_size=4, seed=0)
    with pytest.raises(UserError, match="not divisible"):
        make_train_iterator([cache], process_count=3, **kw)
    with pytest.raises(UserError, match="process_index"):
        make_train_iterator([cache], process_index=2, process_count=2, **kw)
    with pytest.raises(UserError, match="no data sources"):
        make_train_iterator([], **kw)


def test_eval_batches(cache):
    kw = dict(seq_len=16, batch_size=4, num_batches=3)
    a, b = make_eval_batches(cache, **kw), make_eval_batches(cache, **kw)
    assert len(a) == 3
    held = _window_set(cache.heldout_tokens, 16)
    for x, y in zip(a, b, strict=True):
        _check_batch(x, cache, 16, 4)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
        assert all(_row_bytes(x, r, cache.heldout_tokens.dtype) in held for r in range(4))
    parts = [make_eval_batches(cache, process_index=i, process_count=2, **kw) for i in range(2)]
    for j in range(3):
        np.testing.assert_array_equal(np.concatenate([p[j]["inputs"] for p in parts]), a[j]["inputs"])
    with pytest.raises(UserError, match="held-out split"):
        make_eval_batches(cache, seq_len=10**7, batch_size=4, num_batches=1)
