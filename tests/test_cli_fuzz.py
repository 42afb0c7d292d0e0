"""No traceback from the CLI, whatever the input: property-based fuzzing of `train`, `sweep --dry-run`, `fit`
and `predict` with mutated configs, sweep specs, results lines and FIT.json files (Hypothesis).

Each example starts from a valid input, mutates it (wrong types, unknown keys, negative, huge and non-finite
numbers, missing sections, non-mapping documents, binary junk, truncated files) and calls `qwenjax.cli.main`
in-process. Every outcome must be exit 0 or 2 (an uncaught exception fails the test with the input that
raised it), a failure must be exactly one `qwenjax: error:` line on stderr (after any `qwenjax: warning:`
lines about the input, e.g. skipped results lines), and the input files must be unchanged. Nothing trains:
`train` runs with `--print-config` or with `qwenjax.train.train` replaced by a stub (the checks before
training are what is fuzzed), and `sweep` runs with `--dry-run --no-probe`.
Derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")  # the `test` extra installs it
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qwenjax.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: QWENJAX_FUZZ_SCALE=10 runs ten times the examples (a deeper local search; CI runs the default)
SCALE = int(os.environ.get("QWENJAX_FUZZ_SCALE", "1"))
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------------------------------------------------
# Valid starting points


def _config_tree() -> dict:
    tree = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    tree.pop("base", None)
    tree.setdefault("train", {})["steps"] = 2
    return tree


def _spec_tree() -> dict:
    return {"name": "fuzz", "base": str(ROOT / "configs" / "tiny.yaml"),
            "models": [{"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "num_key_value_heads": 1}],
            "tokens": [16384], "lr": [1e-3, 4e-3], "batch_size": [4, 8], "overrides": {"train.seq_len": 64}}


def _shipped_spec(name: str) -> dict:
    tree = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text())
    tree["base"] = str((ROOT / "sweeps" / tree["base"]).resolve())
    return tree


SPECS = [_spec_tree(), *(_shipped_spec(n) for n in ("tiny", "cpu-ladder", "gpu-ladder", "tpu-v5e-ladder"))]
RESULTS = [json.loads(line) for line in (ROOT / "sweeps" / "results" / "cpu-ladder.jsonl").read_text().splitlines()
           if line.strip()][::4]


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="qwenjax-fuzz-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def fit_tree(workdir):
    """A real FIT.json (loss law included) from a quarter of the committed ladder, as a tree to mutate."""
    results = workdir / "base-results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
    out = workdir / "base-FIT.json"
    assert main(["fit", str(results), "-o", str(out), "--bootstrap", "20"]) == 0
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------
# Mutations

NASTY_NUMBERS = [0, -1, -7, 1, 2, 3, 10**30, -(10**30), 2**63, 1e308, -1e308, 1e-308, 0.5, -0.5,
                 math.nan, math.inf, -math.inf]
JUNK = st.one_of(
    st.none(), st.booleans(), st.sampled_from(NASTY_NUMBERS), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "auto", "1e-3", "18T", "qwen2.5-0.5b", "wsd", "nan", "-1", "true", "../..", "\x00"]),
    st.lists(st.one_of(st.integers(-3, 1000), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=2),
)


def _paths(tree, prefix=()):
    """Every key path of a nested tree (lists: their first three items only; FIT.json has long ones)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree[:3]) if isinstance(tree, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


def _parent(tree, path):
    for key in path[:-1]:
        tree = tree[key]
    return tree


@st.composite
def mutated_tree(draw, base):
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(tree))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(tree, path)
        op = draw(st.sampled_from(["set", "set", "set", "delete", "unknown"]))
        if op == "set":
            parent[path[-1]] = draw(JUNK)
        elif op == "delete":
            del parent[path[-1]]
        else:
            target = parent[path[-1]]
            if isinstance(target, dict):
                target[draw(st.sampled_from(["lr", "stepz", "x", "format", "0"]))] = draw(JUNK)
            else:
                parent[path[-1]] = draw(JUNK)
    return tree


@st.composite
def document(draw, base, dump):
    """Bytes of a file: the base mutated, or a whole document that is not what was asked for."""
    kind = draw(st.sampled_from(["tree"] * 8 + ["not_mapping", "binary", "truncated", "empty"]))
    if kind == "tree":
        return dump(draw(mutated_tree(base)))
    if kind == "not_mapping":
        return dump(draw(st.one_of(JUNK, st.lists(JUNK, max_size=3))))
    if kind == "binary":
        return draw(st.binary(max_size=64))
    if kind == "truncated":
        text = dump(base)
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    return b""


def _yaml(tree) -> bytes:
    return yaml.safe_dump(tree, allow_unicode=True).encode()


def _json(tree) -> bytes:
    return json.dumps(tree).encode()


@st.composite
def results_file(draw):
    """results.jsonl: some rows mutated, junk lines inserted, or the whole file junk."""
    if draw(st.integers(0, 9)) == 0:
        return draw(document(RESULTS[0], _json))
    rows = [json.dumps(r) for r in RESULTS]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(rows) - 1))
        op = draw(st.sampled_from(["mutate", "mutate", "junk", "drop"]))
        if op == "mutate":
            rows[i] = json.dumps(draw(mutated_tree(RESULTS[i])))
        elif op == "junk":
            rows.insert(i, draw(st.one_of(st.text(max_size=30), st.binary(max_size=30).map(repr))))
        else:
            del rows[i]
    return ("\n".join(rows) + "\n").encode()


# ---------------------------------------------------------------------------------------------------------
# The property


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class _Example:
    """A fresh folder per example: inputs under in/, outputs under out/."""

    count = 0

    def __init__(self, workdir: Path, files: dict[str, bytes]):
        _Example.count += 1
        self.root = workdir / f"ex{_Example.count}"
        self.inputs, self.out = self.root / "in", self.root / "out"
        self.inputs.mkdir(parents=True)
        self.out.mkdir()
        for name, data in files.items():
            (self.inputs / name).write_bytes(data)

    def path(self, name: str) -> str:
        return str(self.inputs / name)


def check(capsys, example: _Example, argv: list[str]) -> int:
    """Run the command: exit 0 or 2, a failure is one `qwenjax: error:` line (warnings may precede it), the
    inputs stay unchanged."""
    before = _digest(example.inputs)
    capsys.readouterr()
    status = main(argv)  # an uncaught exception fails the test here, with the example that raised it
    _, err = capsys.readouterr()
    assert status in (0, 2), f"exit {status}: {argv}\n{err}"
    if status == 2:
        *warnings, last = err.strip().splitlines() or [""]
        assert last.startswith("qwenjax: error: "), f"{argv}\n{err}"
        assert all(line.startswith("qwenjax: warning: ") for line in warnings), f"{argv}\n{err}"
    assert _digest(example.inputs) == before, f"inputs changed by {argv}"
    return status


def _no_training(cfg):
    raise AssertionError(f"train() was reached for {cfg.run_dir}: the fuzz test must not train")


def _stub_train(cfg):
    return {"status": "ok", "steps_completed": 0}


OVERRIDES = st.lists(st.sampled_from(["train.steps=-1", "train.steps=abc", "train.batch_size=3", "mesh.fsdp=0",
                                      "optim.lr=1e999", "model.hidden_size=7", "train.wandb=maybe",
                                      "run_dir=", "bogus.key=1", "train.steps=1e30", "=", "seed=[1]"]),
                     max_size=2)


@settings(max_examples=200 * SCALE, **SETTINGS)
@example(config=b"\x9e\x00", fit=None, fit_doc=None, overrides=[], print_config=True)  # not UTF-8
@given(config=document(_config_tree(), _yaml), fit=st.none() | st.just("valid") | st.just("mutated"),
       fit_doc=st.data(), overrides=OVERRIDES, print_config=st.booleans())
def test_train_never_raises(capsys, workdir, fit_tree, config, fit, fit_doc, overrides, print_config):
    files = {"config.yaml": config}
    if fit is not None:
        files["FIT.json"] = _json(fit_tree) if fit == "valid" else fit_doc.draw(document(fit_tree, _json))
    ex = _Example(workdir, files)
    argv = ["train", ex.path("config.yaml"), f"run_dir={ex.out / 'run'}", *overrides]
    if fit is not None:
        argv += ["--hparams", ex.path("FIT.json")]
    if print_config:
        argv.append("--print-config")
    with mock.patch("qwenjax.train.train", _no_training if print_config else _stub_train):
        check(capsys, ex, argv)


@settings(max_examples=200 * SCALE, **SETTINGS)
@example(spec=b"\xd9", devices=None, workers=[])  # not UTF-8
@example(spec=_yaml({**_spec_tree(), "base": "\x1e0"}), devices=None, workers=[])  # a line break in the error
@example(spec=_yaml({**_spec_tree(), "tokens": [1e308]}), devices=None, workers=[])  # overflowed the totals
@example(spec=_yaml({**_spec_tree(), "batch_size": [3]}), devices=2, workers=[])  # batch vs devices
@given(spec=st.sampled_from(SPECS).flatmap(lambda base: document(base, _yaml)),
       devices=st.sampled_from([None, 1, 2, 3]), workers=st.sampled_from([[], ["--workers=0"], ["--workers=2"]]))
def test_sweep_dry_run_never_raises(capsys, workdir, spec, devices, workers):
    ex = _Example(workdir, {"spec.yaml": spec})
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"} if devices else {}
    with mock.patch.dict(os.environ, env), mock.patch("qwenjax.train.train", _no_training):
        check(capsys, ex, ["sweep", ex.path("spec.yaml"), "--out", str(ex.out / "sweep"), "--dry-run",
                           "--no-probe", *workers])


FIT_OPTIONS = st.lists(st.sampled_from([
    "--tolerance=0", "--tolerance=-1", "--tolerance=nan", "--tolerance=0.05", "--holdout=largest",
    "--holdout=N>=5e4", "--holdout=D>=abc", "--holdout=N>=-1", "--holdout=", "--batch-law=D",
    "--loss-column=final_loss", "--strict", "--method=prior", '--prior={"beta": 0.3}', "--prior={", "--prior=[1]",
    '--prior={"sd": {"beta": -1}}', "--bootstrap=-1", "--bootstrap=0", "--seed=-5"]), max_size=3, unique=True)


@settings(max_examples=150 * SCALE, **SETTINGS)
@given(results=results_file(), method=st.sampled_from(["smooth", "nearopt", "surface"]), options=FIT_OPTIONS)
def test_fit_never_raises(capsys, workdir, results, method, options):
    ex = _Example(workdir, {"results.jsonl": results})
    check(capsys, ex, ["fit", ex.path("results.jsonl"), "-o", str(ex.out / "FIT.json"), "--bootstrap", "8",
                       "--no-loss-law", "--method", method, *options])


SIZES = st.sampled_from(["1e6", "494M", "7B", "0", "-5", "nan", "inf", "1e400", "abc", "18T", ""])


@settings(max_examples=200 * SCALE, **SETTINGS)
@given(fit=st.data(), params=SIZES, tokens=SIZES, preset=st.sampled_from([None, "qwen2.5-0.5b", "qwen9"]),
       options=st.lists(st.sampled_from(["--seq-len=0", "--seq-len=-1", "--seq-len=1099511627776",
                                         "--multiple-of=0", "--multiple-of=-3", "--multiple-of=8", "--force"]),
                        max_size=2, unique=True))
def test_predict_never_raises(capsys, workdir, fit_tree, fit, params, tokens, preset, options):
    ex = _Example(workdir, {"FIT.json": fit.draw(document(fit_tree, _json))})
    size = ["--preset", preset] if preset else [f"--params={params}"]
    check(capsys, ex, ["predict", ex.path("FIT.json"), *size, f"--tokens={tokens}", *options])
