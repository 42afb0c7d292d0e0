"""The demo pipeline in miniature (tiny corpus, tiny grid) end to end, its rerun, and its bad-input paths."""

import json
import os
import random
import string
import time

import pytest

from qwenjax import cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few dozen small Python-like documents: enough text for a 400-token tokenizer and a held-out split."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(400)]
    for i in range(60):
        lines = []
        for j in range(25):
            name, arg, doc = rng.choice(words), rng.choice(words), " ".join(rng.choices(words, k=6))
            lines.append(f"def {name}_{j}({arg}, n={j}):\n    # {doc}.\n    return {arg} * {rng.randint(0, 99)} + n\n")
        (root / f"m{i}.py").write_text("\n".join(lines))
    return root


@pytest.mark.slow
def test_demo_miniature_end_to_end_and_rerun(tmp_path, corpus, capsys):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    assert cli.main(["demo", "--out", str(out), "--data", str(corpus), "--plan", "mini"]) == 0
    first_s = time.perf_counter() - t0
    report = (out / "report.md").read_text()
    for heading in ("## Sweep", "## Fitted laws", "## Prediction", "## Check at the target", "**Verdict:**",
                    "Noise floor", "ladder rules:"):
        assert heading in report
    assert ("PASSED" in report) != ("MISSED" in report)  # the verdict says plainly which
    assert (out / "FIT.json").is_file() and (out / "plots" / "check_grid.png").is_file()
    fit = json.loads((out / "FIT.json").read_text())
    assert fit["data"]["cells"] >= 4 and fit["noise"]["relative"] is not None
    # the check: lr x {0.5, 1, 2} and batch x {0.5, 1, 2} around the prediction, every point with a second seed
    main_rows = [json.loads(line) for line in (out / "main" / "results.jsonl").read_text().splitlines()]
    lrs, batches = {r["lr"] for r in main_rows}, {r["batch_size"] for r in main_rows}
    assert len(lrs) == 3 and len(main_rows) == 3 * len(batches) and len(batches) >= 2
    assert sorted(lrs)[2] / sorted(lrs)[0] == pytest.approx(4, rel=1e-4)
    seed_rows = [json.loads(line) for line in (out / "main-seeds" / "results.jsonl").read_text().splitlines()]
    assert {r["seed"] for r in seed_rows} == {1}
    point = lambda r: (r["lr"], r["batch_size"])
    assert sorted(map(point, seed_rows)) == sorted(map(point, main_rows))
    assert {r["status"] for r in main_rows + seed_rows} <= {"ok", "diverged"}
    sweep_rows = [json.loads(line) for line in (out / "sweep" / "results.jsonl").read_text().splitlines()]
    assert any(r.get("fork_of") for r in sweep_rows) and any(r["grid"] == "noise" for r in sweep_rows)
    mtime = os.path.getmtime(out / "sweep" / "results.jsonl")

    t0 = time.perf_counter()  # a rerun reuses the token cache and every finished run
    assert cli.main(["demo", "--out", str(out), "--data", str(corpus), "--plan", "mini"]) == 0
    assert os.path.getmtime(out / "sweep" / "results.jsonl") == mtime
    assert time.perf_counter() - t0 < first_s / 2


def test_check_verdict_passes_within_half_a_percent_of_the_best_grid_point():
    from qwenjax.demo import check_verdict

    grid = {(1e-3, 4): 3.00, (2e-3, 4): 3.01, (4e-3, 4): 3.10}
    ok, text = check_verdict(grid, (2e-3, 4), [3.01, 3.02], noise=0.002)
    assert ok and text.startswith("PASSED") and "0.50%" in text and "noise floor 0.20%" in text
    ok, text = check_verdict(grid, (2e-3, 4), [3.01, 3.03])  # mean 3.02: 0.67% above the best
    assert not ok and "MISSED" in text and "0.67% above" in text
    ok, text = check_verdict(grid, (1e-3, 4), [3.00, 3.004])
    assert ok and "best of the grid" in text
    ok, text = check_verdict(grid, (1e-3, 4), [3.00, float("inf")])  # a diverged seed is a miss
    assert not ok and "MISSED" in text


@pytest.mark.parametrize("case", ["nothing", "empty", "binary"])
def test_demo_bad_data_is_one_line(tmp_path, case, capsys):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "binary":
        data.mkdir()
        (data / "blob.bin").write_bytes(bytes(range(256)) * 64)
    assert cli.main(["demo", "--out", str(tmp_path / "out"), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwenjax: error:") and str(data.name) in err[0]
