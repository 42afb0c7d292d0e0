"""Regenerate the example outputs in the docs from the committed data, so they cannot drift.

Each example is a block in a Markdown file between

    <!-- example: qwenjax fit sweeps/results/cpu-ladder.jsonl -o FIT.json -->
    <!-- /example -->

The command is run (in a scratch directory that sees the repository's `sweeps/`, so commands read exactly as
written and later ones see the files earlier ones wrote) and the block is replaced with the command and its
output: stdout, then the `qwenjax: ...` warning lines of stderr (progress lines are left out).

    python docs/examples.py             # rewrite the blocks
    python docs/examples.py --check     # exit 1, naming the files, if a block differs (tests/test_doc_examples.py)
    python docs/examples.py --notebook  # also re-execute notebooks/scaling_laws.ipynb in place (`make docs`)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "docs" / "scaling.md"]
NOTEBOOK = ROOT / "notebooks" / "scaling_laws.ipynb"
BLOCK = re.compile(r"(<!-- example: (?P<cmd>.+?) -->\n)(?P<body>.*?)(<!-- /example -->)", re.DOTALL)


def _qwenjax() -> str:
    """The console script beside this interpreter (a virtual environment's), else the one on PATH."""
    beside = Path(sys.executable).parent / "qwenjax"
    return str(beside) if beside.exists() else "qwenjax"


def run_example(command: str, workdir: Path) -> str:
    """The block body for one command: the command, stdout and stderr's `qwenjax:` lines, fenced."""
    argv = shlex.split(command)
    if argv[0] != "qwenjax":
        raise SystemExit(f"examples must be qwenjax commands, got {command!r}")
    env = {**os.environ, "PYTHONHASHSEED": "0", "COLUMNS": "120"}
    proc = subprocess.run([_qwenjax(), *argv[1:]], cwd=workdir, capture_output=True, text=True, env=env)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("qwenjax:")]
    lines = [f"$ {command}", *proc.stdout.rstrip("\n").splitlines(), *warnings]
    if proc.returncode:
        lines.append(f"(exit status {proc.returncode})")
    return "```text\n" + "\n".join(lines) + "\n```\n"


def render(text: str, workdir: Path) -> str:
    """`text` with every example block's body regenerated, in order."""
    return BLOCK.sub(lambda m: m.group(1) + run_example(m.group("cmd"), workdir) + m.group(4), text)


def execute_notebook(path: Path = NOTEBOOK) -> None:
    """Re-execute a notebook in place with its default inputs (the committed data), dropping per-run
    metadata (timestamps) so that only real changes show in a diff."""
    import nbclient  # optional dependencies (the `notebooks` extra), needed only here
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWENJAX_")}
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute(env=env)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a block differs; write nothing")
    parser.add_argument("--notebook", action="store_true", help=f"also re-execute {NOTEBOOK.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    stale = []
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "sweeps").symlink_to(ROOT / "sweeps")
        for path in FILES:
            text = path.read_text(encoding="utf-8")
            new = render(text, Path(scratch))
            if new != text:
                stale.append(path.relative_to(ROOT))
                if not args.check:
                    path.write_text(new, encoding="utf-8")
    if args.notebook and not args.check:
        execute_notebook()
    if args.check and stale:
        print(f"examples out of date in {', '.join(map(str, stale))}: run python docs/examples.py", file=sys.stderr)
        return 1
    print(
        ("up to date: " if not stale else "rewrote: ")
        + ", ".join(str(p) for p in stale or [f.relative_to(ROOT) for f in FILES])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
