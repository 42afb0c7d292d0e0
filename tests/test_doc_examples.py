"""The example outputs in the docs are what the commands print on the committed data (`python docs/examples.py`
regenerates them; `make docs`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "docs" / "examples.py"


def _examples():
    spec = importlib.util.spec_from_file_location("doc_examples", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_examples_are_current():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + "\nrun: python docs/examples.py"
    assert "up to date" in proc.stdout


def test_blocks_are_regenerated(tmp_path):
    examples = _examples()
    text = "before\n<!-- example: qwenjax fit --help -->\nstale output\n<!-- /example -->\nafter\n"
    new = examples.render(text, tmp_path)
    assert new.startswith(
        "before\n<!-- example: qwenjax fit --help -->\n```text\n$ qwenjax fit --help\nusage: qwenjax fit"
    )
    assert "stale output" not in new and new.endswith("```\n<!-- /example -->\nafter\n")
    assert examples.render(new, tmp_path) == new
    blocks = [m.group("cmd") for m in examples.BLOCK.finditer((SCRIPT.parent / "scaling.md").read_text())]
    assert any(cmd.startswith("qwenjax fit sweeps/results/cpu-ladder.jsonl") for cmd in blocks)
    assert any(cmd.startswith("qwenjax predict FIT.json") for cmd in blocks)
