"""Every command in the README is real: each `qwenjax ...` line parses with the real CLI (subcommand and flags
exist), each repo file it names exists, each `make` target exists, and each command is run for real by a test
or the demo (the table below says where)."""

import re
import shlex
from pathlib import Path

import pytest

from qwenjax.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# subcommand -> the test that runs it for real (file must exist and mention the subcommand)
EXERCISED_BY = {
    "train": "tests/test_train.py", "bench": "tests/test_bench.py", "sweep": "tests/test_sweep_run.py",
    "fit": "tests/test_scaling_cli.py", "predict": "tests/test_scaling_cli.py", "convert": "tests/test_hf.py",
    "generate": "tests/test_generate.py", "demo": "tests/test_demo.py", "plan": "tests/test_plan.py",
}


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_the_two_quickstart_commands():
    quick = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert re.findall(r"```bash\n(.*?)```", quick, flags=re.S)[0].split() == ["make", "demo", "make", "test"]


@pytest.mark.parametrize("line", [c for c in _commands() if c.startswith("qwenjax ")])
def test_readme_qwenjax_command_parses(line):
    argv = shlex.split(line)[1:]
    args = parse_args(argv)  # raises UserError on an unknown subcommand or flag
    assert callable(args.func)
    for word in argv:  # repo files it names exist (configs, sweeps, notebooks)
        if re.match(r"^(configs|sweeps|notebooks)/\S+\.(yaml|ipynb)$", word):
            assert (ROOT / word).is_file(), word
    test_file = ROOT / EXERCISED_BY[argv[0]]
    assert test_file.is_file() and argv[0] in test_file.read_text()


@pytest.mark.parametrize("line", [c for c in _commands() if c.startswith("make ")])
def test_readme_make_targets_exist(line):
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{line.split()[1]}:", makefile, flags=re.M)


def test_readme_only_runs_known_programs():
    assert all(c.split()[0] in ("qwenjax", "make") for c in _commands())


def test_every_file_the_readme_points_to_exists():
    for path in re.findall(r"`((?:docs|configs|sweeps|notebooks|qwenjax)/[\w./-]+)`", README):
        assert (ROOT / path).exists(), path
