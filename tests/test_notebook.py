"""notebooks/scaling_laws.ipynb is committed executed from the committed ladder, runs top to bottom, and
re-executing it gives the same text (numbers to within 2%, so a different BLAS cannot fail it)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "scaling_laws.ipynb"
REAL_RESULTS = Path(__file__).parent.parent / "sweeps" / "results" / "cpu-ladder.jsonl"
SILENT = {0}  # code cells (by index among code cells) that only import and set up
PLOTS = {"lr_sweeps.png", "batch_sweeps.png", "hparam_laws.png", "loss_law.png", "holdout.png", "predictions.png"}
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _texts(cell) -> list[str]:
    """A cell's text outputs: streams and the plain-text form of results (figures left out)."""
    out = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            out.append(o.text)
        elif "text/plain" in o.get("data", {}) and "image/png" not in o.data:
            out.append(o.data["text/plain"])
        elif o.output_type == "error":
            out.append("\n".join(o.traceback))
    return out


def _same(a: str, b: str) -> bool:
    """Equal text, numbers equal to within 2% (the bootstrap's last digits may differ across platforms)."""
    words_a, words_b = NUMBER.split(a), NUMBER.split(b)
    nums_a, nums_b = NUMBER.findall(a), NUMBER.findall(b)
    if words_a != words_b or len(nums_a) != len(nums_b):
        return False
    return all(
        math.isclose(float(x), float(y), rel_tol=0.02, abs_tol=1e-9) for x, y in zip(nums_a, nums_b, strict=True)
    )


def test_committed_notebook_shows_its_results():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for i, cell in enumerate(_code_cells(nb)):
        if i in SILENT:
            continue
        assert cell.outputs, f"code cell {i} was committed without outputs: run `make docs`"
        assert all(o.output_type != "error" for o in cell.outputs), f"code cell {i} failed"
    streams = "".join(o.text for c in _code_cells(nb) for o in c.outputs if o.output_type == "stream")
    assert PLOTS <= set(streams.split())  # every plot, the holdout's among them, printed and shown
    images = [o for c in _code_cells(nb) for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(PLOTS)
    assert "holdout" in streams and "fitted on" in streams and "quality:" in streams
    assert "cpu-ladder.jsonl" in streams  # from the committed ladder, not a synthetic stand-in
    assert NOTEBOOK.stat().st_size < 1_000_000, "keep the committed figures small (dpi, palette)"
    raw = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert not any("execution" in c.get("metadata", {}) for c in raw["cells"]), "strip execution timestamps"


def test_scaling_notebook_executes(tmp_path, monkeypatch):
    if not REAL_RESULTS.exists():
        from qwenjax.scaling.synthetic import synthetic_results, write_results

        rows = synthetic_results(n_values=(1e6, 2e6, 4e6), d_values=(2.5e7, 5e7, 1e8), lr_span=3, batch_span=1)
        monkeypatch.setenv("QWENJAX_RESULTS", str(write_results(tmp_path / "results.jsonl", rows)))
    monkeypatch.setenv("QWENJAX_FIT", str(tmp_path / "FIT.json"))  # the kernel inherits the environment
    committed = nbformat.read(NOTEBOOK, as_version=4)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    assert (tmp_path / "FIT.json").exists()
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == PLOTS  # with the holdout plot
    text = "".join(o.get("text", "") for c in _code_cells(nb) for o in c.get("outputs", []))
    assert "qwenjax train CONFIG.yaml --hparams" in text
    if not REAL_RESULTS.exists():
        return
    for i, (old, new) in enumerate(zip(_code_cells(committed), _code_cells(nb), strict=True)):
        old_texts = _texts(old)
        new_texts = [t.replace(str(tmp_path / "FIT.json"), "outputs/FIT.json") for t in _texts(new)]
        assert len(old_texts) == len(new_texts), f"code cell {i}: outputs changed; run `make docs`"
        for a, b in zip(old_texts, new_texts, strict=True):
            assert _same(a, b), f"code cell {i} now prints\n{b}\ninstead of the committed\n{a}\nrun `make docs`"
