"""Sweep specs, planning, adaptive grids and the results file: fast checks without training."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qwenjax.errors import UserError
from qwenjax.sweep import adaptive
from qwenjax.sweep.plan import Planner, run_id_of
from qwenjax.sweep.results import ResultsStore, append_line, read_lines
from qwenjax.sweep.spec import ladder_models, ladder_shape, lattice, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1}


def spec_tree(**changes) -> dict:
    tree = {"name": "t", "base": str(ROOT / "configs" / "tiny.yaml"), "models": [MODEL], "tokens": [16384],
            "lr": [1e-3, 4e-3], "batch_size": [4, 8], "overrides": {"train.seq_len": 64}}
    tree.update(changes)
    return {k: v for k, v in tree.items() if v is not None}


def write_spec(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_tree(**changes)))
    return path


# ---------------------------------------------------------------------------------------------------------
# Spec and plan


def test_lr_range_is_the_shared_log_lattice():
    spec = parse_spec(spec_tree(lr={"min": 1e-4, "max": 3e-2, "per_octave": 2}))
    values = spec.lr.values
    assert values[0] == pytest.approx(2**-13) and values[-1] == pytest.approx(2**-5.5)
    assert all(b / a == pytest.approx(2**0.5) for a, b in zip(values, values[1:], strict=False))
    assert lattice(2**-3, 2**-3, 2) == [2**-3]


def test_plan_ids_are_stable_and_config_derived(tmp_path):
    spec = parse_spec(spec_tree())
    runs = Planner(spec, tmp_path).initial_runs()
    assert len(runs) == 4 and len({r.run_id for r in runs}) == 4
    again = Planner(parse_spec(spec_tree()), tmp_path / "elsewhere").initial_runs()
    assert [r.run_id for r in runs] == [r.run_id for r in again]  # run_dir is not part of the id
    r = runs[0]
    assert r.run_id == run_id_of(r.cfg) and Path(r.cfg.run_dir) == tmp_path / "runs" / r.run_id
    assert r.steps == round(16384 / (r.batch_size * 64)) and r.tokens_trained == 16384
    row = r.row("t")
    assert row["n_params"] < row["n_params_total"] and row["batch_tokens"] == r.batch_size * 64
    assert {r.shape_key for r in runs if r.batch_size == 4} == {runs[0].shape_key}  # lr does not change shape
    assert len({r.population_key for r in runs}) == 2  # one population per batch size


def test_preset_entry_and_ladder(tmp_path):
    spec = parse_spec(spec_tree(models=[MODEL, {"preset": "qwen2.5-0.5b"}]))
    planner = Planner(spec, tmp_path)
    big = planner.models[1]
    assert big.config.hidden_size == 896 and big.n_params == 357_898_112  # base shape fields were reset
    shape = ladder_shape(3.6e8)  # Qwen2.5-0.5B's non-embedding size -> its shape
    assert shape == {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2}
    models = ladder_models({"sizes": [3e4, 1e5, 3e5], "head_dim": 16})
    ns = [Planner(parse_spec(spec_tree(models=[m])), tmp_path).models[0].n_params for m in models]
    assert ns == sorted(ns) and ns[-1] / ns[0] > 8
    for n, target in zip(ns, (3e4, 1e5, 3e5), strict=True):
        assert abs(math.log(n / target)) < math.log(1.6)


def test_adaptive_grids_centre_on_the_step_law(tmp_path):
    lr, batch_tokens = adaptive.step_law(1e5, 1e6)
    assert lr == pytest.approx(1.79 * 1e5**-0.713 * 1e6**0.307)
    assert batch_tokens == pytest.approx(0.58 * 1e6**0.571)
    spec = parse_spec(spec_tree(lr={"around": "prior", "span_octaves": 1, "per_octave": 2},
                                batch_size={"around": "prior", "span_octaves": 1}, tokens=[1e6]))
    planner = Planner(spec, tmp_path)
    lrs, batches = planner.cell_grid(0, 1e6)
    n = planner.models[0].n_params
    centre = adaptive.step_law(n, 1e6)[0]
    assert len(lrs) == 5 and min(lrs) < centre < max(lrs)
    assert abs(math.log2(lrs[2] / centre)) <= 0.25  # snapped to the 2^(k/2) lattice
    assert len(batches) == 3 and batches[0] < adaptive.step_law(n, 1e6)[1] / 64 < batches[-1]


def _row(lr, b, loss, status="ok"):
    return {"lr": lr, "batch_size": b, "final_loss": loss, "eval_loss": None, "status": status}


def test_extension_points():
    f = 2.0
    bracketed = [_row(1e-3, 8, 3.0), _row(2e-3, 8, 2.9), _row(4e-3, 8, 3.1)]
    assert adaptive.extension_points(bracketed, f, None) == []
    top = [_row(1e-3, 8, 3.0), _row(2e-3, 8, 2.9)]
    assert adaptive.extension_points(top, f, None) == [(0.004, 8), (0.008, 8)]
    bottom = [_row(1e-3, 8, 2.8), _row(2e-3, 8, 2.9), _row(4e-3, 8, 3.0, "diverged")]
    assert adaptive.extension_points(bottom, f, None) == [(0.0005, 8), (0.00025, 8)]
    all_diverged = [_row(1e-3, 8, None, "diverged"), _row(2e-3, 8, None, "diverged")]
    assert adaptive.extension_points(all_diverged, f, None) == [(0.0005, 8), (0.00025, 8)]
    batch_edge = [_row(2e-3, 4, 3.0), _row(1e-3, 8, 3.0), _row(2e-3, 8, 2.8), _row(4e-3, 8, 3.0)]
    assert adaptive.extension_points(batch_edge, f, 2.0) == [(0.001, 16), (0.002, 16), (0.004, 16)]
    # bracketed, but the top edge is only 0.3% worse: with a 1% margin one more lr above it
    flat_top = [_row(1e-3, 8, 3.0), _row(2e-3, 8, 2.9), _row(4e-3, 8, 2.909)]
    assert adaptive.extension_points(flat_top, f, None) == []
    assert adaptive.extension_points(flat_top, f, None, margin=0.01) == [(0.008, 8)]
    assert adaptive.extension_points(bracketed, f, None, margin=0.01) == []


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def run_cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenjax.commands.sweep", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                          timeout=timeout)


@pytest.mark.parametrize("changes, message", [
    ({"lrs": [1e-3]}, "unknown key 'lrs' (did you mean 'lr'?)"),
    ({"lr": []}, "lr: empty grid"),
    ({"lr": {"min": 1e-3, "max": 1.1e-3, "per_octave": 1}}, "lr: empty grid"),
    ({"batch_size": []}, "batch_size: empty grid"),
    ({"tokens": [100]}, "tokens 100 is smaller than one batch"),
    ({"models": [MODEL, {**MODEL, "num_attention_heads": 3}]},
     "models[1]: model.hidden_size (32) must be divisible"),
    ({"models": [{"hiden_size": 32}]},
     "models[0]: unknown model field 'hiden_size' (did you mean 'hidden_size'?)"),
    ({"overrides": {"optim.lr": 1e-3}}, "'optim.lr' is set by the sweep"),
    ({"overrides": {"train.seqlen": 64}}, "train.seqlen"),
    ({"ladder": {"sizes": [1e5]}}, "either `models:`"),
    ({"bracket_margin": 1.5}, "bracket_margin must be a relative loss in [0, 1)"),
    ({"noise_seeds": [0]}, "noise_seeds: [0] already in seeds"),
])
def test_bad_specs_fail_with_one_line(tmp_path, changes, message):
    with pytest.raises(UserError) as e:
        tree = spec_tree(**changes)
        Planner(parse_spec(tree), tmp_path).initial_runs()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_spec_and_dead_ray_address(tmp_path):
    out = tmp_path / "out"
    r = run_cli(write_spec(tmp_path, batch_sizes=[4]), "--out", out, "--dry-run", "--no-probe")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "unknown key 'batch_sizes' (did you mean 'batch_size'?)" in r.stderr
    assert not out.exists()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli(write_spec(tmp_path), "--out", out, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert r.returncode == 2 and "does not answer" in r.stderr and r.stderr.strip().count("\n") == 0
    assert not (out / "results.jsonl").exists()


def test_dry_run_lists_runs_with_flops(tmp_path):
    r = run_cli(ROOT / "sweeps" / "tiny.yaml", "--out", tmp_path / "o", "--dry-run", "--no-probe")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x[:12].strip() and len(x.split()) == 9]
    assert len(lines) == 1 + 8  # header + runs
    assert "total: 8 runs" in r.stdout and "FLOPs" in r.stdout


def test_shipped_specs_plan(tmp_path):
    for name in ("tiny", "cpu-ladder", "gpu-ladder", "tpu-v5e-ladder"):
        spec = load_spec(ROOT / "sweeps" / f"{name}.yaml")
        runs = Planner(spec, tmp_path / name).initial_runs()
        assert len(runs) >= 8, name


def test_cpu_ladder_spans_the_required_ranges(tmp_path):
    planner = Planner(load_spec(ROOT / "sweeps" / "cpu-ladder.yaml"), tmp_path)
    runs = planner.initial_runs()
    ns = sorted({r.model.n_params for r in runs})
    ds = sorted({r.tokens for r in runs})
    assert len(ns) >= 4 and ns[-1] / ns[0] >= 10 and ns[-1] <= 1e6
    assert len(ds) >= 3 and ds[-1] / ds[0] >= 4
    batches = sorted({r.batch_size for r in runs})
    lrs = sorted({r.lr for r in runs})
    assert batches[-1] / batches[0] >= 4 and lrs[-1] / lrs[0] >= 8 * (1 - 1e-4)
    assert planner.spec.fork_cooldowns and len(planner.spec.noise_seeds) >= 2 and planner.spec.bracket_margin > 0


# ---------------------------------------------------------------------------------------------------------
# results.jsonl


def test_results_appends_are_whole_lines_under_concurrency(tmp_path):
    path = tmp_path / "results.jsonl"
    code = ("import sys\nfrom qwenjax.sweep.results import append_line\n"
            "for i in range(200):\n"
            "    append_line(sys.argv[1], {'run_id': f'{sys.argv[2]}-{i}', 'pad': 'x' * 5000})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(w)]) for w in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    rows, bad = read_lines(path)
    assert bad == 0 and len(rows) == 800 and len({r["run_id"] for r in rows}) == 800


def test_results_reader_ignores_a_torn_tail_and_writers_start_a_fresh_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_line(path, {"run_id": "a", "loss": float("nan")})
    with open(path, "ab") as f:
        f.write(b'{"run_id": "torn", "lo')
    rows, bad = read_lines(path)
    assert [r["run_id"] for r in rows] == ["a"] and rows[0]["loss"] is None
    append_line(path, {"run_id": "b"})
    rows, bad = read_lines(path)
    assert [r["run_id"] for r in rows] == ["a", "b"] and bad == 1
    for line in path.read_text().splitlines():
        if line.startswith('{"run_id": "a"') or line.startswith('{"run_id": "b"'):
            json.loads(line)
    store = ResultsStore(tmp_path)
    with pytest.raises(ValueError):
        store.append({"run_id": "c"})  # incomplete lines are refused


def test_adaptive_grid_around_a_fit_file(tmp_path):
    from qwenjax.scaling import load_results, make_fit, predict, save_fit
    from qwenjax.scaling.synthetic import synthetic_results, write_results

    results = write_results(tmp_path / "results.jsonl", synthetic_results(seq_len=64))
    fit = make_fit(load_results(results), loss_law=False, bootstrap=20)
    save_fit(fit, tmp_path / "FIT.json")
    spec_path = write_spec(tmp_path, lr={"around": "FIT.json", "span_octaves": 1, "per_octave": 2},
                           tokens=[1e6])  # the fit's path is relative to the spec's folder
    planner = Planner(load_spec(spec_path), tmp_path / "out")
    n = planner.models[0].n_params
    lrs, _ = planner.cell_grid(0, 1e6)
    centre = predict(fit, n, 1e6)["lr"]
    assert len(lrs) == 5 and abs(math.log2(lrs[2] / centre)) <= 0.25
    with pytest.raises(UserError, match="neither 'prior' nor an existing FIT.json"):
        Planner(parse_spec(spec_tree(lr={"around": "missing.json"})), tmp_path)
