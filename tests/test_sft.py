"""SFT (train.objective sft, docs/post-training.md): chat data packed whole with segment ids, one-line errors
through the CLI, and a short configs/sft-tiny.yaml run whose held-out assistant-token loss falls."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import CONFIGS

from qwenjax.errors import UserError

SFT_TINY = CONFIGS / "sft-tiny.yaml"


def arithmetic_conversations(n: int, seed: int = 0) -> list[dict]:
    """Synthetic chat data: one- or two-turn additions, a system prompt on some."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": "You are a calculator."})
        for _ in range(rng.choice((1, 1, 2))):
            a, b = rng.randrange(100), rng.randrange(100)
            msgs.append({"role": "user", "content": f"What is {a} + {b}?"})
            msgs.append({"role": "assistant", "content": f"{a} + {b} = {a + b}."})
        out.append({"messages": msgs})
    return out


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("chat") / "arith.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in arithmetic_conversations(1500)))
    return f


def sft_config(chat_file, cache, run_dir, *extra):
    from qwenjax.run_config import load_config

    return load_config(SFT_TINY, [f"data.path={chat_file}", f"data.cache_dir={cache}", f"run_dir={run_dir}",
                                  *extra])


@pytest.fixture(scope="module")
def chat_data(chat_file, qwenjax_cache, tmp_path_factory):
    from qwenjax.data.prepare import prepare_data

    cfg = sft_config(chat_file, qwenjax_cache, tmp_path_factory.mktemp("run"))
    return cfg, prepare_data(cfg)


def test_objective_names_match():
    from qwenjax.run_sections import OBJECTIVE_NAMES
    from qwenjax.train.objectives import OBJECTIVES

    assert set(OBJECTIVE_NAMES) == set(OBJECTIVES)


def test_packing_segments_positions_mask(chat_data):
    """Every row: whole conversations, each its own segment with positions from 0, inputs/targets its ids
    shifted by one, loss_mask its assistant mask of the target token; padding is one more segment, mask 0."""
    cfg, data = chat_data
    chat, T = data.chat, cfg.train.seq_len
    assert data.caches == [chat] and chat.num("heldout") > 0
    it = chat.train_iterator(seq_len=T, global_batch_size=4, seed=0)
    seen = 0
    for step in range(3):
        batch = it.batch_at(step)
        for r in range(4):
            convs = it._row(step * 4 + r)
            t = 0
            for seg, i in enumerate(convs, 1):
                ids, mask = chat.conversation("train", i)
                n = len(ids) - 1
                np.testing.assert_array_equal(batch["inputs"][r, t:t + n], ids[:-1])
                np.testing.assert_array_equal(batch["targets"][r, t:t + n], ids[1:])
                np.testing.assert_array_equal(batch["loss_mask"][r, t:t + n], mask[1:])
                assert (batch["segment_ids"][r, t:t + n] == seg).all()
                np.testing.assert_array_equal(batch["positions"][r, t:t + n], np.arange(n))
                t += n
                seen += 1
            assert t <= T and (batch["loss_mask"][r, t:] == 0).all()
            assert (batch["segment_ids"][r, t:] == len(convs) + 1).all()
    assert seen > 12  # several conversations per row
    # next conversation would not have fit: rows are next-fit packed
    from qwenjax.data import check_batch

    check_batch(batch, 4, T)
    # the state round-trips
    it2 = chat.train_iterator(seq_len=T, global_batch_size=4, seed=0)
    next(it), next(it)
    it2.set_state(json.loads(json.dumps(it.get_state())))
    np.testing.assert_array_equal(next(it2)["inputs"], next(it)["inputs"])


def test_epochs_cover_every_conversation_once(chat_data):
    cfg, data = chat_data
    it = data.chat.train_iterator(seq_len=cfg.train.seq_len, global_batch_size=2, seed=3)
    for epoch in (0, 1):
        rows = it.rows_of_epoch(epoch)
        flat = sorted(i for row in rows for i in row)
        assert flat == list(range(data.chat.num("train")))
    assert it.rows_of_epoch(0) != it.rows_of_epoch(1)  # reshuffled each epoch


def test_too_long_conversation(chat_data, tmp_path):
    cfg, data = chat_data
    with pytest.raises(UserError) as e:
        data.chat.check_lengths(8, truncate=False)
    assert "\n" not in str(e.value) and ".jsonl:" in str(e.value) and "data.truncate" in str(e.value)
    data.chat.check_lengths(8, truncate=True)
    batch = data.chat.train_iterator(seq_len=8, global_batch_size=2, seed=0, truncate=True).batch_at(0)
    assert batch["inputs"].shape == (2, 8)


def test_bad_messages_via_cli_exit_2(run_cli, chat_file, qwenjax_cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = chat_file.read_text().splitlines()[:20]
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]})
    bad.write_text("\n".join(lines) + "\n")
    status, out, err = run_cli("train", SFT_TINY, f"data.path={bad}", f"data.cache_dir={qwenjax_cache}",
                               f"run_dir={tmp_path / 'run'}")
    assert status == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1].startswith("qwenjax: error: ") and f"{bad}:7: message 1 has no \"content\"" in lines[-1], err
    assert sum(x.startswith("qwenjax: error") for x in lines) == 1 and "Traceback" not in err


def test_sft_on_text_data_is_one_line(tmp_path):
    from qwenjax.data.prepare import is_chat
    from qwenjax.run_config import load_config

    cfg = load_config(SFT_TINY, [f"data.path={tmp_path}", "data.format=text"])
    with pytest.raises(UserError, match="train.objective sft trains on chat data"):
        is_chat(cfg, [])


def test_sft_tiny_run_loss_falls(chat_file, qwenjax_cache, tmp_path):
    """configs/sft-tiny.yaml, shortened: the assistant-token loss falls well below its start."""
    from qwenjax.train import train

    run = tmp_path / "sft"
    summary = train(sft_config(chat_file, qwenjax_cache, run, "train.steps=30"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert summary["status"] == "ok" and len(losses) >= 5
    assert losses[-1] < 0.6 * losses[0], losses
    assert summary["eval_loss"] < 0.6 * summary["initial_loss"], summary
    # a second stage from it (model.init_from, the stage's own tokenizer): starts where the first ended
    tok = run / "model" / "tokenizer.model"
    chained = train(sft_config(chat_file, qwenjax_cache, tmp_path / "stage2", "train.steps=2",
                               f"model.init_from={run}", f"data.tokenizer={tok}"))
    assert chained["initial_loss"] < 0.6 * summary["initial_loss"], chained


def test_sft_resume_is_exact(chat_file, qwenjax_cache, tmp_path, caplog):
    """The chat iterator's state goes into the checkpoint: 3 steps + 3 resumed steps = 6 steps straight."""
    import logging

    from qwenjax.train import train

    common = ["optim.schedule=constant", "optim.warmup_steps=0", "train.log_every=1", "eval.batches=1"]
    train(sft_config(chat_file, qwenjax_cache, tmp_path / "straight", "train.steps=6", *common))
    train(sft_config(chat_file, qwenjax_cache, tmp_path / "split", "train.steps=3", *common))
    with caplog.at_level(logging.INFO, logger="qwenjax"):
        train(sft_config(chat_file, qwenjax_cache, tmp_path / "split", "train.steps=6", *common))
    assert "from step 3" in caplog.text

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("straight")) == 6 and losses("split") == losses("straight")


def test_packed_conversation_sees_only_itself(chat_data):
    """A conversation's logits in a packed row equal its logits alone in a row: segments isolate attention
    and positions restart (so packing changes nothing but throughput)."""
    import jax

    from qwenjax import model as qmodel
    from qwenjax.run_config import model_config
    from qwenjax.train import init_train_state

    cfg, data = chat_data
    chat, T = data.chat, cfg.train.seq_len
    mc = model_config(cfg, vocab_size=data.vocab_size)
    params = init_train_state(mc, jax.random.key(0))["params"]
    it = chat.train_iterator(seq_len=T, global_batch_size=1, seed=0)
    row = it._row(0)
    assert len(row) >= 2
    packed = it.batch_at(0)

    def logits(batch):
        out, _ = qmodel.apply(mc, params, batch["inputs"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"])
        return np.asarray(out)

    full = logits(packed)
    t = 0
    for i in row:
        n = len(chat.conversation("train", i)[0]) - 1
        alone = logits(chat.rows_batch("train", [[i]], T))
        np.testing.assert_allclose(full[0, t:t + n], alone[0, :n], rtol=2e-4, atol=2e-4)
        t += n
