"""`qwenjax bench train`: one JSON line with qwenjax and torch throughput measured in the same process."""

import json

import pytest

from qwenjax import cli

TINY = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=2",
        "train.batch_size=2", "train.seq_len=32"]


def test_bench_train_prints_json_with_ratio(capsys):
    pytest.importorskip("torch")
    assert cli.main(["bench", "train", *TINY, "--steps", "1", "--rounds", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens_per_s"] > 0 and out["torch_tokens_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["tokens_per_s"] / out["torch_tokens_per_s"], rel=1e-2)
    assert 0 < out["mfu"] < 1.5 and out["hidden_size"] == 64 and out["seq_len"] == 32
    assert "measured CPU" in out["peak_source"]


def test_bench_rejects_bad_steps(capsys):
    assert cli.main(["bench", "train", *TINY, "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps" in err[0]


def test_bench_train_profile_splits_both_sides(capsys):
    pytest.importorskip("torch")
    assert cli.main(["bench", "train", *TINY, "--steps", "1", "--rounds", "1", "--profile"]) == 0
    prof = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["profile"]
    parts = ("dots", "attention", "elementwise", "loss", "optimizer")
    assert tuple(prof["parts"]) == parts
    for side in ("qwenjax", "torch"):
        ms = {k: v["ms"] for k, v in prof[side].items()}
        assert all(ms[p] > 0 for p in (*parts, "step"))
        assert ms["rest"] == pytest.approx(ms["step"] - sum(ms[p] for p in parts), abs=0.05)
    assert set(prof["torch_over_qwenjax"]) == {*parts, "step"}
