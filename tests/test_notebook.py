"""notebooks/scaling_laws.ipynb runs top to bottom (the real CPU sweep if present, else a synthetic one)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "scaling_laws.ipynb"
REAL_RESULTS = Path(__file__).parent.parent / "sweeps" / "results" / "cpu-ladder.jsonl"


def test_scaling_notebook_executes(tmp_path, monkeypatch):
    if not REAL_RESULTS.exists():
        from qwenjax.scaling.synthetic import synthetic_results, write_results

        rows = synthetic_results(
            n_values=(1e6, 2e6, 4e6), d_values=(2.5e7, 5e7, 1e8), lr_span=3, batch_span=1
        )
        monkeypatch.setenv("QWENJAX_RESULTS", str(write_results(tmp_path / "results.jsonl", rows)))
    monkeypatch.setenv("QWENJAX_FIT", str(tmp_path / "FIT.json"))  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=90, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    assert (tmp_path / "FIT.json").exists()
    assert len(list((tmp_path / "plots").glob("*.png"))) == 6  # with the holdout plot
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "qwenjax train CONFIG.yaml --hparams" in text
