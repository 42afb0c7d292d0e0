"""The long-context study (`qwenjax demo --long`) in miniature end to end, its rerun, and its pieces."""

import os
import time

import numpy as np
import pytest

from qwenjax import cli
from qwenjax.config import ModelConfig
from qwenjax.demo_long import DRILL_REPEATS, METHODS, PLANS, make_document, make_drill, method_overrides
from qwenjax.demo_long_report import LABELS
from qwenjax.evals.checkpoint import apply_overrides
from qwenjax.evals.passkey import HEAD, QUESTION, answer_of


def test_documents_hold_the_key_and_its_answer():
    rng = np.random.default_rng(0)
    for n in (0, 40, 400):
        doc = make_document(rng, n, 4.0)
        assert doc.startswith(HEAD)
        before, answer = doc.rsplit(QUESTION, 1)
        key = answer_of(answer)
        assert key is not None and len(key) == 5 and f" The pass key is {key}. Remember it." in before


def test_drills_repeat_a_span_of_words_and_numbers():
    rng = np.random.default_rng(0)
    for _ in range(4):
        doc = make_drill(rng)
        span = doc[:-1][: len(doc[:-1]) // DRILL_REPEATS]
        assert doc == span * DRILL_REPEATS + "." and span.startswith(" ") and "pass key" not in doc
    assert any(c.isdigit() for c in doc)


def test_method_overrides_apply_to_an_eval():
    plan = PLANS["full"]
    config = ModelConfig(max_position_embeddings=plan.seq_len)
    yarn = apply_overrides(config, method_overrides("yarn", plan))
    assert yarn.rope_scaling_dict["factor"] == plan.factor
    dca = apply_overrides(config, method_overrides("dca", plan))
    assert dca.dca_dict == {"chunk_size": plan.seq_len, "local_size": plan.dca_local_size}
    assert method_overrides("base", plan) == method_overrides("abf", plan) == {}


def test_long_refuses_options_of_the_other_demo(tmp_path, capsys):
    assert cli.main(["demo", "--long", "--out", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "--long" in capsys.readouterr().err
    assert cli.main(["demo", "--long", "--post", "--out", str(tmp_path)]) == 2
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.slow
def test_long_demo_miniature_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "long"
    t0 = time.perf_counter()
    assert cli.main(["demo", "--long", "--out", str(out), "--plan", "mini"]) == 0
    first_s = time.perf_counter() - t0
    report = (out / "report.md").read_text()
    for heading in ("## Verdict", "## Table", "## Passkey heatmaps", "## Loss by position"):
        assert heading in report
    for method in METHODS:
        assert LABELS[method] in report
        assert (out / "plots" / f"passkey-{method}.png").is_file()
        assert (out / "evals" / f"{method}.json").is_file()
    plan = PLANS["mini"]
    for n in (plan.seq_len, plan.seq_len * plan.factor):
        assert (out / "plots" / f"loss-by-position-{n}.png").is_file()
    assert (out / "abf" / "stages" / "0" / "summary.json").is_file()  # the ABF stage ran through stages:
    stamps = {m: os.stat(out / "evals" / f"{m}.json").st_mtime_ns for m in METHODS}

    t0 = time.perf_counter()
    assert cli.main(["demo", "--long", "--out", str(out), "--plan", "mini"]) == 0
    again_s = time.perf_counter() - t0
    assert {m: os.stat(out / "evals" / f"{m}.json").st_mtime_ns for m in METHODS} == stamps
    assert again_s < first_s / 2, (again_s, first_s)
    assert str(out / "report.md") in capsys.readouterr().out
